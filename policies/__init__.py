"""Pluggable policies: pure decision objects, registered by name (``load_policy("smart", catalog)``)."""

from policies.base import Policy, PolicyParams, available_policies, load_policy, register
from policies.baselines import BatchAll, CacheOnly, Fixed, Naive
from policies.smart import Smart, SmartParams

__all__ = ["BatchAll", "CacheOnly", "Fixed", "Naive", "Policy", "PolicyParams", "Smart", "SmartParams",
           "available_policies", "load_policy", "register"]
