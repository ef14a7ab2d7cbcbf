"""benchmarks/train_step.py's parts: one worker per tool (run_*.py, each run in a fresh process), the GEMM
ceiling, the shared measurements (worker_common), the report and the diffusers/PEFT provisioning."""
