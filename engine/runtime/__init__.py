"""The runtime kernel, shared verbatim by the simulator and the actors: the policy loop over open groups
(``scheduler``), a provider's queue, rate gate and draws (``providers``), reuse lookup (``reuse``) and what an
ended attempt becomes (``outcomes``). No I/O: each runtime applies what these return, on virtual time or
with timers and messages."""
