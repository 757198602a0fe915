#!/usr/bin/env bash
# The command of one device call (after dev/gpu/gpu_carry.sh here):
#
#   run(command="bash dev/gpu/gpu_session.sh tests bench", carry=[".carry"], timeout_s=600)
#
# A task lent a GPU has 15 device minutes in all (machine start, every call and idle time
# counted) and one call runs at most 10 minutes, so plan ONE call: the parts run in the order
# given, each under its cap within GPU_BUDGET_S, and a part cut by its cap keeps what it wrote
# (the bench writes one JSON per configuration, b1 before b4). The CUDA tests go first (capped
# at TESTS_S, 150 s by default): a wrong kernel makes every timing moot. Untried on a GPU as
# of writing: if the first call shows the suite is too slow, the second choice is
# "BENCH_FILTER='_b1_' bash dev/gpu/gpu_session.sh tests bench".
#
# Unpacks .carry/ into $GPU_SITE (default /tmp/site; skipped when a warm machine already has
# it), exports PYTHONPATH=$GPU_SITE:$PWD, records versions, then runs the PARTs in order, each
# under `timeout` and all within GPU_BUDGET_S (default 540 s, the device allows 600 per call):
#
#   tests      pytest on the CUDA cases (-k "cuda or igemm"; -k cpu without CUDA): every op and engine,
#              spconv's implicit GEMM, the converted networks
#   tests-all  the whole suite except slow tests (CPU and CUDA cases)
#   engines    cad-spconv bench --model conv3x3 (256 and 512 channels, 1024x2048, fp32):
#              lattice / torch / spconv / spconv-igemm per layer, for the "auto" choice on CUDA
#   bench      python -m experiments.benchmark gpu --frames .carry/frames --no-markdown --overwrite
#              (DeepLabV3-ResNet101 1024x2048, batch 1 and 4, fp32 (TF32 on / off) / fp16 / bf16)
#   profile    cad-spconv bench --profile 30 on one frame (1024x2048, batch 1, each dtype of
#              PROFILE_DTYPE (float16), edge PROFILE_THRESHOLD (0.35), every engine that runs
#              there): device time per op and the host's total, to see where CAD's time goes
#   probe      dev/gpu/probe_half_inf.py: the float16 -Inf finding (cuDNN's float16 conv
#              returning 0.0 for the lattice engine's inputs): each call against float64, 40 s
#   cpu-targets  dev/gpu/cpu_targets.py: issue 14's CPU targets (those named CPU_FILTER,
#              default bfloat16) on this host's CPU, CPU_JOBS (4) results at a time, each
#              pinned to 2 physical cores, --reps CPU_REPS (3)
#   products   python -m experiments.products_first layers --engines torch,products on CUDA (for
#              each dtype of PRODUCTS_DTYPE, "float32 bfloat16"): the products engine against
#              what "auto" picks there, per layer shape, before changing select_engine
#   eval       cad-spconv eval on CUDA in float16 over a synthetic Cityscapes-format folder at
#              1024x2048 (random weights, edge:0.35): the user's path end to end -> $OUT/eval.json
#
# Files under $OUT (at most 8 come back): session.log (everything printed), env.json
# (versions), tests.xml / tests-all.xml (JUnit), results.tar.gz (the result JSONs this call
# wrote, to unpack into experiments/results/), bench.md (their tables, as `--markdown` writes).
#
# Knobs (environment): GPU_BUDGET_S, TESTS_S (150), TESTS_ALL_S (480), ENGINES_S (200),
# BENCH_S (500) caps per part; TESTS_K (pytest -k expression); BENCH_FILTER (regex on the
# suite's result names, e.g. _b1_ or _b4_: run only those, when all eight do not fit one call);
# BENCH_REPS (5); CPU_S (400), CPU_FILTER, CPU_JOBS, CPU_REPS; ENGINES_SIZE ("1024 2048");
# EVAL_S (90), EVAL_DTYPE (float16), EVAL_SIZE ("1024, 2048"); PROFILE_S (90 per dtype),
# PROFILE_DTYPE (float16; a list such as "float16 float32" profiles each), PROFILE_THRESHOLD
# (0.35); PRODUCTS_S (120 per dtype), PRODUCTS_DTYPE; TESTS_WORKERS (pytest-xdist processes for the tests part; unset: one); PYTHON (python3).
# Options: --dry-run (unpack and check the carried packages, print what would run; run nothing),
# --no-site (use the installed packages as they are: for trying this script on a dev machine).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
CARRY=$ROOT/.carry
SITE=${GPU_SITE:-/tmp/site}
BUDGET=${GPU_BUDGET_S:-540}
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

DRY=0 NOSITE=0 PARTS=()
for a in "$@"; do
    case $a in
        --dry-run) DRY=1 ;;
        --no-site) NOSITE=1 ;;
        tests|tests-all|engines|bench|profile|probe|cpu-targets|products|eval) PARTS+=("$a") ;;
        -h|--help) sed -n '2,/^set -uo/{/^#/p}' "$0"; exit 0 ;;
        *) echo "gpu_session: unknown part '$a' (tests, tests-all, engines, bench, profile, probe, cpu-targets, products, eval)" >&2; exit 2 ;;
    esac
done
((${#PARTS[@]})) || { echo "usage: bash dev/gpu/gpu_session.sh [--dry-run] [--no-site] PART..." >&2; exit 2; }
if [[ -z ${OUT:-} ]]; then
    OUT=${TMPDIR:-/tmp}/gpu_session_out
    echo "gpu_session: OUT is not set, writing to $OUT"
fi
mkdir -p "$OUT"
MARK=$(mktemp)  # result JSONs newer than this were written by this call

elapsed() { echo $(($(date +%s) - T0)); }
say() { printf '\n=== [%4ss] %s\n' "$(elapsed)" "$*"; }

setup_site() {
    if ((NOSITE)); then
        say "setup: --no-site, using the installed packages"
        export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
        return 0
    fi
    [[ -d $CARRY ]] || { echo "gpu_session: no .carry/ (run dev/gpu/gpu_carry.sh here, carry ['.carry'])"; return 1; }
    local stamp
    stamp=$(cd "$CARRY" && ls -l --time-style=+%s -- *.whl *.tar.xz 2>/dev/null | awk '{print $5, $6, $7}' | sha1sum | cut -c1-16)
    if [[ -f $SITE/.carry_stamp && $(cat "$SITE/.carry_stamp") == "$stamp" ]]; then
        say "setup: $SITE already holds this .carry (warm machine)"
    else
        say "setup: unpacking .carry into $SITE"
        rm -rf "$SITE" && mkdir -p "$SITE" || return 1
        local f
        for f in "$CARRY"/*.tar.xz; do
            [[ -e $f ]] || continue
            tar -xJf "$f" -C "$SITE" --no-same-owner || { echo "gpu_session: cannot unpack $f"; return 1; }
        done
        if compgen -G "$CARRY/*.whl" >/dev/null; then
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --disable-pip-version-check --target "$SITE" "$CARRY"/*.whl \
                || { echo "gpu_session: pip install --target $SITE failed"; return 1; }
        fi
        echo "$stamp" >"$SITE/.carry_stamp"
        du -sh "$SITE"
    fi
    export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}
}

versions() {
    say "versions"
    nvidia-smi -L 2>&1 || echo "(no nvidia-smi)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
    "$PY" - "$OUT/env.json" "$SITE" "$NOSITE" <<'EOF'
import importlib.metadata as md, json, platform, sys, warnings
out, site, nosite = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
info = {"python": platform.python_version(), "executable": sys.executable}
if not nosite:
    # what the carried folder holds, read from its own metadata (works on any Python)
    info["site"] = {d.metadata["Name"]: d.version for d in md.distributions(path=[site])}
    if sys.version_info[:2] != (3, 12):
        print(f"WARNING: Python {platform.python_version()}: the carried spconv/cumm wheels "
              "are cp312 and will not import here")
import torch
info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(), cuda_available=torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_mem_gib=round(p.total_memory / 2**30, 1))
# defaults that decide fp32 speed: cuDNN convs use TF32, plain matmuls do not unless allowed
info.update(cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
            cudnn_benchmark=torch.backends.cudnn.benchmark)
for name in ("spconv-cu126", "cumm-cu126", "spconv-cu120", "spconv", "pccm", "ccimport", "fire",
             "lark", "termcolor", "numpy", "torchvision", "pybind11", "sympy", "portalocker"):
    try:
        info.setdefault("dists", {})[name] = md.version(name)
    except md.PackageNotFoundError:
        pass
try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import spconv, cumm
    info["spconv_import"] = f"{spconv.__version__} from {spconv.__file__}"
    info["cumm_import"] = f"{cumm.__version__} from {cumm.__file__}"
except Exception as exc:
    info["spconv_import"] = f"FAILED: {exc!r}"
try:
    from cad_spconv.backend import spconv_status
    info["spconv_status"] = list(spconv_status())
    from cad_spconv.engines.spconv_igemm import igemm_status  # the spconv-igemm engine's stack (cumm / NumPy)
    info["igemm_status"] = list(igemm_status())
except Exception as exc:
    info.setdefault("spconv_status", [False, repr(exc)])
    info.setdefault("igemm_status", [False, repr(exc)])
json.dump(info, open(out, "w"), indent=1)
print(json.dumps(info, indent=1))
if not info["spconv_status"][0]:
    print("WARNING: the spconv engine is unavailable in this session:", info["spconv_status"][1])
EOF
}

cap() {  # seconds a part may run: its own cap, within what is left of the budget
    local left=$((BUDGET - $(elapsed) - 25)) own=$1
    ((left < own)) && own=$left
    echo "$own"
}

run_part() {  # name default_cap command...
    local name=$1 secs rc
    secs=$(cap "$2")
    shift 2
    say "$name: $*  (timeout ${secs}s)"
    if ((DRY)); then
        return 0
    fi
    if ((secs < 15)); then
        echo "gpu_session: $name skipped, only ${secs}s left of the ${BUDGET}s budget"
        STATUS+=("$name: skipped (budget)")
        return 0
    fi
    timeout -s INT -k 20 "$secs" "$@"
    rc=$?
    case $rc in
        0) STATUS+=("$name: ok") ;;
        124|137) STATUS+=("$name: TIMED OUT after ${secs}s (partial results kept)") ;;
        *) STATUS+=("$name: FAILED rc=$rc") ;;
    esac
    echo "--- $name rc=$rc after $(elapsed)s"
}

has_cuda() { "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

part_tests() {
    local k=${TESTS_K:-}
    # "igemm": the implicit-GEMM kernel tests carry no device in their ids
    [[ -n $k ]] || { if has_cuda; then k="cuda or igemm"; else k=cpu; echo "(no CUDA: running the cpu cases)"; fi; }
    # a module that cannot be imported there fails alone, not the whole run; TESTS_WORKERS=N
    # spreads the cases over N processes (pytest-xdist, in the device image)
    local workers=()
    [[ -n ${TESTS_WORKERS:-} ]] && workers=(-n "$TESTS_WORKERS")
    run_part tests "${TESTS_S:-150}" "$PY" -m pytest -q -k "$k" -p no:cacheprovider "${workers[@]}" \
        --continue-on-collection-errors --tb=short --durations=25 --junitxml="$OUT/tests.xml" -o junit_family=xunit2
}

part_tests_all() {
    run_part tests-all "${TESTS_ALL_S:-480}" "$PY" -m pytest -q -p no:cacheprovider \
        --continue-on-collection-errors --tb=short --durations=25 --junitxml="$OUT/tests-all.xml" -o junit_family=xunit2
}

part_engines() {
    local dev=cpu engines=lattice,torch,spconv size=(${ENGINES_SIZE:-1024 2048}) c
    has_cuda && { dev=cuda; engines=$engines,spconv-igemm; }
    for c in 256 512; do
        local name="${dev/cuda/gpu}_conv3x3_${c}_${size[0]}x${size[1]}"
        run_part "engines[$c]" "$(( ${ENGINES_S:-200} / 2 ))" "$PY" -m cad_apps.cli bench \
            --model conv3x3 --channels "$c" --size "${size[@]}" --images .carry/frames/*.png \
            --threshold 0.35 --dilation 11 --device "$dev" --dtype float32 \
            --engine "$engines" --reps "${BENCH_REPS:-5}" --warmup 1 \
            --json "experiments/results/$name.json" --label "$name"
    done
}

part_bench() {
    local frames=.carry/frames
    if [[ -z ${BENCH_FILTER:-} ]]; then
        # --overwrite: a rerun on the same lent machine replaces its own earlier results
        run_part bench "${BENCH_S:-500}" "$PY" -m experiments.benchmark gpu --frames "$frames" \
            --no-markdown --reps "${BENCH_REPS:-5}" --overwrite
        return
    fi
    # a subset of the same suite: the commands benchmark.py would run, filtered by name
    run_part "bench[$BENCH_FILTER]" "${BENCH_S:-500}" "$PY" - "$frames" "$BENCH_FILTER" \
        "${BENCH_REPS:-5}" <<'EOF'
import glob, os, re, shlex, sys
frames_dir, pattern, reps = sys.argv[1], sys.argv[2], int(sys.argv[3])
from experiments.benchmark import suites
from cad_apps import bench
from cad_apps.cli import build_parser
frames = sorted(glob.glob(os.path.join(frames_dir, "*.png")))
parser = build_parser("bench")
chosen = [(n, a) for n, a in suites(frames, reps)["gpu"] if re.search(pattern, n)]
if not chosen:
    sys.exit(f"BENCH_FILTER={pattern!r} matches none of {[n for n, _ in suites(frames, reps)['gpu']]}")
for name, args in chosen:
    full = ["bench", *args, "--json", f"experiments/results/{name}.json", "--label", name]
    command = "cad-spconv " + shlex.join(full)
    print(command, flush=True)
    bench.main(parser.parse_args(full), command=command)
EOF
}

part_profile() {  # one run per dtype of PROFILE_DTYPE (a space-separated list)
    local dev=cpu engines=lattice,torch dtype
    has_cuda && { dev=cuda; engines=$engines,spconv-igemm; }
    local thr=${PROFILE_THRESHOLD:-0.35}
    for dtype in ${PROFILE_DTYPE:-float16}; do
        local name="${dev/cuda/gpu}_profile_deeplabv3_resnet101_1024x2048_b1_$dtype"
        [[ $thr == 0.35 ]] || name+="_edge$thr"
        run_part "profile[$dtype]" "${PROFILE_S:-90}" "$PY" -m cad_apps.cli bench \
            --model deeplabv3_resnet101 --size 1024 2048 \
            --images .carry/frames/frankfurt_000000_002196_leftImg8bit.png \
            --threshold "$thr" --dilation 11 --device "$dev" --dtype "$dtype" \
            --engine "$engines" --reps 3 --warmup 1 --no-memory --profile 30 \
            --json "experiments/results/$name.json" --label "$name"
    done
}

part_products() {  # one table per dtype of PRODUCTS_DTYPE, into session.log
    local dev=cpu engines=lattice,products dtype
    has_cuda && { dev=cuda; engines=torch,products; }
    for dtype in ${PRODUCTS_DTYPE:-float32 bfloat16}; do
        run_part "products[$dtype]" "${PRODUCTS_S:-120}" "$PY" -m experiments.products_first \
            layers --frame .carry/frames/frankfurt_000000_002196_leftImg8bit.png \
            --device "$dev" --engines "$engines" --dtype "$dtype" --reps 5
    done
}

part_eval() {
    local root=${TMPDIR:-/tmp}/cityscapes_synthetic dev=cpu
    has_cuda && dev=cuda
    ((DRY)) || "$PY" -c "import sys; from cad_apps.data import make_synthetic_cityscapes as m; \
m(sys.argv[1], 'val', num_images=4, size=(${EVAL_SIZE:-1024, 2048}), seed=0)" "$root" \
        || { STATUS+=("eval: FAILED writing the synthetic folder"); return; }
    run_part eval "${EVAL_S:-90}" "$PY" -m cad_apps.cli eval --data-root "$root" --device "$dev" \
        --dtype "${EVAL_DTYPE:-float16}" --mask edge:0.35 --num-workers 2 --no-progress \
        --overwrite --out "$OUT/eval.json"
}

collect() {  # result JSONs of this call -> results.tar.gz + bench.md
    local new
    mapfile -t new < <(find experiments/results -name '*.json' -newer "$MARK" 2>/dev/null | sort)
    ((${#new[@]})) || { echo "(no result JSON written)"; return 0; }
    say "collect: ${#new[@]} result file(s) -> $OUT/results.tar.gz, $OUT/bench.md"
    tar -czf "$OUT/results.tar.gz" "${new[@]}"
    "$PY" - "$OUT/bench.md" "${new[@]}" <<'EOF'
import json, sys
from cad_apps.bench import markdown
with open(sys.argv[1], "w") as out:
    for path in sys.argv[2:]:
        try:
            out.write(markdown(json.load(open(path))))
        except Exception as exc:  # a partial or foreign file: say so, go on
            out.write(f"\n<!-- {path}: {exc!r} -->\n")
EOF
}

main() {
    STATUS=()
    say "gpu_session: parts ${PARTS[*]}; budget ${BUDGET}s; $(hostname); $(date -u +%FT%TZ)"
    setup_site || { echo "gpu_session: setup failed"; return 1; }
    versions
    if ((DRY)); then
        say "dry run: would run"
        "$PY" -m experiments.benchmark gpu --frames .carry/frames --no-markdown --dry-run \
            | sed 's/^/    /'
    fi
    local p
    for p in "${PARTS[@]}"; do
        case $p in
            tests) part_tests ;;
            tests-all) part_tests_all ;;
            engines) part_engines ;;
            bench) part_bench ;;
            profile) part_profile ;;
            probe) run_part probe 60 "$PY" dev/gpu/probe_half_inf.py ;;
            cpu-targets) run_part cpu-targets "${CPU_S:-400}" "$PY" dev/gpu/cpu_targets.py \
                --filter "${CPU_FILTER:-bfloat16}" --frames .carry/frames \
                --reps "${CPU_REPS:-3}" --jobs "${CPU_JOBS:-4}" ;;
            products) part_products ;;
            eval) part_eval ;;
        esac
    done
    ((DRY)) || collect
    say "summary"
    printf '  %s\n' "${STATUS[@]}"
    ls -l "$OUT"
    [[ " ${STATUS[*]} " != *"FAILED"* && " ${STATUS[*]} " != *"TIMED OUT"* ]]
}

main 2>&1 | tee -a "$OUT/session.log"
rc=${PIPESTATUS[0]}
rm -f "$MARK"
exit "$rc"
