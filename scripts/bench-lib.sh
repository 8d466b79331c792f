# Shared by the shell benches (sourced): timing of one command run.

seconds() { # command...: wall seconds of one run, its output discarded
  local start end
  start=$(date +%s.%N)
  "$@" >/dev/null 2>&1
  end=$(date +%s.%N)
  python3 -c "print($end - $start)"
}

medians() { # baseline-name contender-name "baseline times" "contender times": medians and their ratio
  python3 - "$@" <<'PY'
import statistics, sys
a_name, b_name = sys.argv[1:3]
a, b = (statistics.median(map(float, t.split())) for t in sys.argv[3:5])
print(f"medians: {a_name} {a:.3f} s, {b_name} {b:.3f} s; ratio ({a_name} time / {b_name} time) {a / b:.2f}")
PY
}
