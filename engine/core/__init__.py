"""The core floor: values (requests, results, settings), the catalog and its one cost model, features,
traces and the contracts (provider protocol, policy protocol). No I/O beyond reading files, no Ray; every
other layer builds on it."""
