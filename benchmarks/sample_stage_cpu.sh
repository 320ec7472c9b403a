#!/usr/bin/env bash
# CPU time of a study's stage processes, for stage costs on a machine shared with other work (wall time there is
# inflated; a process's CPU time is not): every 15 s, one line per live stage process whose command matches PATTERN:
#   unix time, pid, elapsed s, CPU s, script, the run it writes (--run-name, --output-dir or --output)
# A stage's cost is its last line's CPU time (within 15 s). Stop it with Ctrl-C or kill.
#   bash benchmarks/sample_stage_cpu.sh /work/chain-cost/ runs/stage_cpu_samples.log
set -u
PATTERN=${1:?usage: sample_stage_cpu.sh PATTERN LOG}
LOG=${2:?usage: sample_stage_cpu.sh PATTERN LOG}
while true; do
  ps -eo pid,etimes,times,args | grep -v grep | grep -- "${PATTERN}[a-z_]*\.py" | awk -v t="$(date +%s)" '{
    name = ""; for (i = 5; i <= NF; i++) if ($i == "--run-name" || $i == "--output-dir" || $i == "--output") name = $(i + 1)
    print t, $1, $2, $3, $5, name }' >> "$LOG"
  sleep 15
done
