"""The offline runtime: the discrete-event simulator and the lower bound a policy is judged against."""
