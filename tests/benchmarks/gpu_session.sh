#!/usr/bin/env bash
# One unattended call on a GPU machine that starts bare: bash tests/benchmarks/gpu_session.sh OUT PART [WHEELS]
#
#   PART toy:        the toy's vision tower from scratch, then the surgery term (gpu_toytrain.py, 5 minutes of
#                    training, a checkpoint a minute), into OUT/toy/.
#   PART throughput: the out-of-memory back-off identity (gpu_checks.py), ascend alone for ViT-B/16 and ViT-L/14
#                    (ascent.py), and the whole pipeline with configs/overnight.yaml on IMAGES images (256 by
#                    default; throughput.py, per-stage seconds), each JSON into OUT/ as it finishes. At the
#                    10,000 images an hour aimed at, 1,000 images take 6 minutes: a call of their own
#                    (IMAGES=1000 and THROUGHPUT_LIMIT=420 with a bare PART throughput-only).
#
# WHEELS, when given, is a folder of wheels for what such a machine may lack (openai-clip, ftfy, wcwidth, kornia,
# kornia_rs), installed first without an index. Every step has its own time limit, so one that hangs leaves the
# others' figures; they add up to under 6 minutes for toy and for throughput, 7 for throughput-only.
set -u
out=${1:?usage: gpu_session.sh OUT toy|throughput|throughput-only [WHEELS]}
part=${2:?usage: gpu_session.sh OUT toy|throughput|throughput-only [WHEELS]}
wheels=${3:-}
cd "$(dirname "$0")/../.."
mkdir -p "$out"
if [ -n "$wheels" ]; then
  python -m pip install -q --no-index --find-links "$wheels" openai-clip ftfy wcwidth kornia kornia_rs \
    > "$out/pip.log" 2>&1 || echo "gpu_session: installing from $wheels failed, see pip.log" >&2
fi
python -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" \
  > "$out/device.txt" 2>&1
git rev-parse HEAD >> "$out/device.txt" 2>/dev/null || true

step() {  # step NAME SECONDS COMMAND...: one benchmark under its own limit, its log beside its JSON
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "$name: exit $? after at most ${limit}s" >> "$out/steps.txt"
}

overnight() {  # overnight SECONDS IMAGES: the whole pipeline with the overnight config, on ViT-B/16's shape
  step throughput "$1" python tests/benchmarks/throughput.py --images "$2" --config configs/overnight.yaml \
    --model random:ViT-B/16 --out "$out/throughput-overnight.json"
}

case "$part" in
  toy)
    step toytrain 340 python tests/benchmarks/gpu_toytrain.py --out "$out/toy" --minutes "${TOY_MINUTES:-5}" \
      --workers "$(( $(nproc) - 1 ))"
    ;;
  throughput-only)
    overnight "${THROUGHPUT_LIMIT:-420}" "${IMAGES:-1000}"
    ;;
  throughput)
    step gpu_checks 80 python tests/benchmarks/gpu_checks.py --scenes 16 --out "$out/gpu_checks.json"
    step ascent-b16 40 python tests/benchmarks/ascent.py --model random:ViT-B/16 --images 64 --iterations 100 \
      --faithful-images 0 --methods gumbel --out "$out/ascent-b16.json"
    step ascent-l14 40 python tests/benchmarks/ascent.py --model random:ViT-L/14 --images 64 --iterations 100 \
      --faithful-images 0 --methods gumbel --out "$out/ascent-l14.json"
    overnight 180 "${IMAGES:-256}"
    ;;
  *)
    echo "gpu_session: PART must be toy, throughput or throughput-only, got $part" >&2
    exit 2
    ;;
esac
cat "$out/steps.txt"
