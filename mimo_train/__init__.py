import warnings

# megatron-core warns, once per module and per process, that Transformer Engine and Apex are missing and it falls
# back to local fused-kernel stand-ins; none of those code paths is ours (the tests compare against megatron-core's
# pure-torch references), so the warning only repeats noise on every rank.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed", category=UserWarning)
