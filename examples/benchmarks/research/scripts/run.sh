#!/bin/bash
# usage: run.sh TASK OPT...
cd /tmp/research
PYTHONPATH=/tmp/research exec nice -n 10 taskset -c 1 env XLA_FLAGS="--xla_cpu_multi_thread_eigen=false" /work/main/.venv/bin/python experiments/bench.py "$@"
