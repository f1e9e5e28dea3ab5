#!/usr/bin/env bash
# One lane of `make test`: pytest processes one after another, every line prefixed with the lane's
# name, in a temporary folder of the lane's own. Two lanes run at once; the separate TMPDIR keeps
# their pytest tmp_path trees, Ray session folders and `ray/ray_current_cluster` (which a bare
# ray.init() would join) apart. Every process runs even after one fails; the lane fails if any did.
#
# Ray starts its workers at niceness 15, below every process of the other lane: there, a lane's
# Ray workers were starved while the other lane computed (a 4-case run on Ray took 495 s beside two
# busy processes, 57 s with RAY_worker_niceness=0; 27 s on an idle machine). The lanes' Ray workers
# run at the tests' own priority. PYTHONFAULTHANDLER makes a process that aborts print where.
#
# One math thread per process (OpenMP, MKL, OpenBLAS; Ray's workers inherit it): the two lanes share
# two cores, and two processes of two threads each spent half the CPU waiting on each other (two
# propagation tests at once: 166 s with two threads each, 90 s with one).
#
# Usage: tests/lane.sh PYTHON NAME 'PYTEST ARGS' ['PYTEST ARGS' ...]
set -uo pipefail
python=$1 name=$2
shift 2
tmp=$(mktemp -d -t "mcs-$name-XXXXXX")
failed=()
n=0
log=$tmp/lane.log
for args in "$@"; do
    n=$((n + 1))
    # shellcheck disable=SC2086  # each argument is one pytest command line, split on purpose
    TMPDIR=$tmp PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 RAY_worker_niceness=0 \
        OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \
        "$python" -m pytest -q -p no:cacheprovider --durations=5 --junitxml="$tmp/$n.xml" $args 2>&1 \
        | sed -u "s/^/[$name] /" | tee -a "$log" || failed+=("$args")
done
if ((${#failed[@]})); then
    # Ray's workers print long tracebacks as a process ends: the tests that failed are repeated
    # here, last, where a log's tail shows them: the last lines of each failure, then their names.
    # With LANE_FAILURES set, the summary is also left in $LANE_FAILURES/NAME.txt, for `make test`
    # to repeat after both lanes (the lane that fails may not be the one that ends last).
    {
        "$python" tests/failures.py "$tmp"/*.xml | sed "s/^/[$name] /"
        grep -E "^\[$name\] (FAILED|ERROR) [^ :]+\.py" "$log" | cut -c1-200
        for args in "${failed[@]}"; do
            echo "[$name] FAILED: pytest ${args:0:120}"
        done
        echo "[$name] its temporary files are kept in $tmp"
    } | tee ${LANE_FAILURES:+"$LANE_FAILURES/$name.txt"}
    exit 1
fi
rm -rf "$tmp"
echo "[$name] passed"
