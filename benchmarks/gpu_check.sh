#!/bin/bash
# One pass over cgmq's CUDA, --amp and NCCL paths on a machine with (at least) one GPU.
#   bash benchmarks/gpu_check.sh            # logs to $OUT/all.log (default /tmp/gpuout)
# FMNIST_DIR: a folder with the four Fashion-MNIST IDX files (default: the Debian package's);
# the full-data part is skipped when it is missing. DEV=cpu runs the same steps on the CPU
# (the --amp step then fails by design: --amp is CUDA only). Results: benchmarks/results/gpu-check.md.
DEV=${DEV:-cuda}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NO_COLOR=1
O=${OUT:-/tmp/gpuout}; mkdir -p $O; T=$(mktemp -d)
L=$O/all.log
step() { local name=$1 lim=$2; shift 2; echo "=== $name: $*" >>$L; local t0=$(date +%s.%N)
  timeout $lim "$@" >>$L 2>&1; local rc=$?; local t1=$(date +%s.%N)
  echo "=== $name rc=$rc wall=$(python3 -c "print(round($t1-$t0,1))")s" | tee -a $L; }
C="python3 -m cgmq_cli"
step info 60 bash -c "nvidia-smi -L; python3 -c 'import torch,onnxruntime,onnx;print(torch.__version__,torch.version.cuda,torch.cuda.is_available(),onnxruntime.__version__,onnx.__version__)'"
step ckpt 120 python3 -c "
import torch; from cgmq_cli import data, models; from cgmq_cli.trainer import train_float
b=data.load_data('digits'); l,_=data.make_loaders(b,32,0,0)
m=train_float(models.DigitsCNN(), l, epochs=4, lr=3e-3, seed=0); torch.save(m.state_dict(), '$T/d.pt')"
D="$T/d.pt --arch cgmq_cli.models:DigitsCNN --data digits --budget-rel-bops 1.5 --epochs 3 --json"
step digits-cpu 300 $C compress $D --device cpu --out $T/cpu
step digits-$DEV 300 $C compress $D --device $DEV --out $T/gpu
step digits-$DEV-amp 300 $C compress $D --device $DEV --amp --out $T/amp
step torchrun1 300 python3 -m torch.distributed.run --standalone --nproc_per_node 1 -m cgmq_cli compress $D --device $DEV --out $T/ddp1
step torchrun2-expect-error 300 python3 -m torch.distributed.run --standalone --nproc_per_node 2 -m cgmq_cli compress $D --device $DEV --out $T/ddp2
step resume-amp 300 $C compress --resume $T/amp --json
for r in gpu amp ddp1; do
  step report-$r 120 $C report $T/$r
  step export-$r 300 $C export $T/$r --onnx
  step verify-$r 300 $C verify $T/$r/model.onnx
  step check-$r 60 $C check $T/$r
done
python3 - >>$L 2>&1 <<PY
import json
for r in ("cpu","gpu","amp","ddp1"):
    try:
        j=json.load(open("$T/%s/report.json"%r))
        print(r, "feasible", j.get("feasible"), "acc", j.get("accuracy"), "widths", [(x["bits_w"],x["bits_a"]) for x in j["layers"]])
    except Exception as e: print(r, "no report", e)
PY
FM=${FMNIST_DIR:-/usr/share/datasets/fashion-mnist}
if [ -d "$FM" ]; then
  F="benchmarks/results/fashion-mnist-float-default-init.pt --arch cgmq_cli.models:LeNet5 --data fashion-mnist:$FM --budget-rel-bops 1.73 --json"
  step fmnist-$DEV 240 $C compress $F --device $DEV --out $T/fm
  step fmnist-$DEV-amp 240 $C compress $F --device $DEV --amp --out $T/fmamp
  for r in fm fmamp; do python3 -c "import json;j=json.load(open('$T/$r/report.json'));print('$r',j['feasible'],j['accuracy'],j.get('cost'))" >>$L 2>&1; grep -h -i "finish\|epoch=.*end" $T/$r/train.log | tail -12 >>$L; done
fi
tar czf $O/runs.tgz -C $T --exclude='*.pt' --exclude='*.onnx' . 2>/dev/null
echo DONE | tee -a $L
