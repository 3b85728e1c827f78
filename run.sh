#!/usr/bin/env bash
# One entry point for people and CI:
#   bash run.sh main   set up .venv, train ProtoNet Conv-4 on Omniglot, evaluate on the fixed
#                      test episodes, append to leaderboard.csv and print the leaderboard
#   bash run.sh test   set up .venv and run the test suite
#   bash run.sh setup  only create/refresh .venv
# Data: $FEWSHOT_NSL_DATA if set, else ../shared/data beside the checkout when present,
# else `fewshot-nsl data prepare omniglot` downloads Omniglot into ~/.cache/fewshot-nsl/data.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv
# glibc keeps freed buffers instead of returning them to the OS: 1.8-2.0x faster CPU episodes (benchmarks/results/throughput.md)
# (2.2-2.5x with channels_last, the default; benchmarks/results/throughput.md).
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=8589934592}
if [ -z "${FEWSHOT_NSL_DATA:-}" ] && [ -d ../shared/data ]; then
    export FEWSHOT_NSL_DATA="$(cd ../shared/data && pwd)"
fi

setup() {
    local stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
    if [ ! -f "$stamp" ]; then
        [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet -e '.[test]'
        rm -f "$VENV"/.installed-*
        touch "$stamp"
    fi
}

main_job() {
    local cli="$VENV/bin/fewshot-nsl" run_dir="runs/main-$(date +%Y%m%d-%H%M%S)"
    if [ -z "${FEWSHOT_NSL_DATA:-}" ]; then
        "$cli" data prepare omniglot
    fi
    "$cli" train --config configs/protonet-conv4-omniglot-main.yaml --run-dir "$run_dir"
    "$cli" eval --run-dir "$run_dir" --ways 5 --shots 1
    "$cli" eval --run-dir "$run_dir" --ways 5 --shots 5
    "$cli" eval --run-dir "$run_dir" --ways 20 --shots 1
    "$cli" eval --run-dir "$run_dir" --ways 20 --shots 5
    "$cli" leaderboard --dataset omniglot
}

case "${1:-}" in
    setup) setup ;;
    main) setup; main_job ;;
    test) setup; shift; exec "$VENV/bin/python" -m pytest -q "$@" ;;
    *) echo "usage: bash run.sh main|test|setup" >&2; exit 2 ;;
esac
