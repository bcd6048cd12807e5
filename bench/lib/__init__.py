"""What the benchmark scripts share: the benchmark model, checkpoint writers, host probes, statistics,
Triton repositories and the swap-load clients. The scripts in ``bench/`` only parse their command
line, run these and write their JSON."""
