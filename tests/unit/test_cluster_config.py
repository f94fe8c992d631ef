"""cluster.yaml is a valid Ray cluster-launcher config (checked offline against Ray's own schema) and pins a
dispatcher node to every provider of the default catalog."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from engine.core.catalog import default_catalog

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_matches_rays_schema(config):
    ray = pytest.importorskip("ray")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)


def test_every_provider_has_a_node_with_its_resource(config):
    offered = {k for t in config["available_node_types"].values() for k in t.get("resources", {})}
    for name in default_catalog().providers:
        assert f"provider:{name}" in offered, name
    assert config["head_node_type"] in config["available_node_types"]


def test_start_commands_are_strings(config):
    # An unquoted {...} in a YAML list becomes a mapping and the launcher fails late; keep them strings.
    for key in ("setup_commands", "head_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert all(isinstance(c, str) for c in config[key]), key


def test_nodes_install_what_they_need(config):
    # Every node needs pip, Ray (with the metrics extras) and smartbatch; the head also needs boto3, which the
    # autoscaler uses to launch the AWS workers.
    setup = " ".join(config["setup_commands"])
    assert "python3-pip" in setup and "ray[default]" in setup and "/home/ubuntu/smartbatch" in setup
    assert any("boto3" in c for c in config["head_setup_commands"])
    assert setup.index("ray[default]") < setup.index("/home/ubuntu/smartbatch")  # Ray before the package
