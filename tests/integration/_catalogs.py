"""Catalogs for integration tests that call one provider (text or images): an engine starts one dispatcher per
provider in its catalog, each its own process (about 0.6 s of a 2-core machine's start-up each), so a test that
never calls the other providers starts without them."""

from pathlib import Path

from engine.core.catalog import Catalog, default_catalog

_CAT = default_catalog()


def only(*providers: str, catalog: Catalog = _CAT) -> Catalog:
    """``catalog`` (the default one) with ``providers`` alone."""
    return catalog.model_copy(update={"providers": {name: catalog.providers[name] for name in providers}})


OPENAI_ONLY = only("openai")


def for_trace(reqs, catalog: Catalog = _CAT) -> Catalog:
    """``catalog`` with the providers ``reqs`` call alone: an engine that replays a synthetic trace needs no
    dispatcher for a provider the trace never names (a seed of ``synth`` calls two or three of the four), and the
    policy decides each request from its own provider's entry."""
    return only(*sorted({r.provider for r in reqs}), catalog=catalog)


def catalog_file(folder: Path, catalog: Catalog, stem: str = "catalog") -> Path:
    """``catalog`` as a catalog file, for the commands' ``--catalog``."""
    import yaml

    path = folder / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(catalog.model_dump(mode="json", exclude_none=True)))
    return path


def openai_only_file(folder: Path) -> Path:
    """``OPENAI_ONLY`` as a catalog file, for ``smartbatch serve --catalog``."""
    return catalog_file(folder, OPENAI_ONLY, "openai-only")
