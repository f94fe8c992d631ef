"""A tenant's name with a space at an end, refused wherever a tenant is given (``Request``, ``tenant_problem``)."""

from __future__ import annotations

__all__ = ["tenant_ends_problem"]


def tenant_ends_problem(tenant: str) -> str:
    """The refusal of a tenant with a space (any whitespace) at an end: "acme " was taken as another tenant than
    "acme", which a budget for acme did not cover (a walkthrough, stop 79). Refused, not stripped: stripped, a request
    journaled under "acme " before (pickled, read back unvalidated) and the same one given again would be two
    requests, two uids and call keys, paid twice; and a result under another tenant than given. One rebuilt from
    its journaled uid is validated with ``context={"kept": True}`` (``actors._batch_strays.stand_in``)."""
    name = tenant.strip()[:60]
    return (f"tenant {tenant[:60]!r} begins or ends with a space, which makes it another tenant than {name!r} (a "
            f"budget for {name!r} does not cover it); " + (f"write {name!r}" if name else "give a name"))
