"""fuyu.benchmarks: workloads, random models, FLOP and byte arithmetic, the reference comparison,
the CPU thread and quantization studies and the GPU check. `fuyu benchmark` is a thin command over
`suite`; the others run as `python -m fuyu.benchmarks.<name>`."""
