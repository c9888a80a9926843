#!/usr/bin/env bash
# The runs behind docs/reproduction.md. Each block trains the ReLU baseline and the Rate Norm
# network (stage 1), tunes the thresholds with the Rate Inference Loss (stage 2), trains the
# QCFS network and the Rate Norm network with quantized rates (L = $LEVELS levels, default 8)
# and tunes the latter's thresholds too, then converts every way and simulates them side by side
# (`rnl-fast compare`: the paper's four methods, qcfs, rnl_qcfs and the latency variants; Table 2,
# results.json, figures). Sizes are what two CPU cores finish in minutes; on a GPU add
# --device cuda and drop the --train-images / --test-images limits. Each training resumes from
# its checkpoint when there is one (a finished one is not trained again), so a rerun only redoes
# what is missing.
#
#   [OUT=runs] [DEVICE=cuda] [LEVELS=8] bash docs/reproduce.sh RUN [CIFAR_DIR]
#   RUN: mnist_cnn7 | mnist_alexnet | fashion_cnn7 | fashion_alexnet | fashion_vgg16 | cifar10_vgg16
#   (results go to $OUT/RUN; cifar10_vgg16 takes the directory holding cifar-10-batches-py)
#
# Stage 2 runs with the paper's choices (λ = 0.5, one p shared by all layers, the defaults) and
# may lose 1 validation point, as the demo.
set -euo pipefail
run="${1:?which run: mnist_cnn7, mnist_alexnet, fashion_cnn7, fashion_alexnet, fashion_vgg16, cifar10_vgg16}"
out="${OUT:-runs}/$run"
mkdir -p "$out"

pipeline() {  # model dataset epochs stage2_epochs T [data args...]; DEVICE=cuda for a GPU
  local model=$1 dataset=$2 epochs=$3 epochs2=$4 T=$5 levels=${LEVELS:-8}
  shift 5
  set -- "$@" --device "${DEVICE:-cpu}"
  local stage1=(rnl-fast train --stage 1 --resume --model "$model" --dataset "$dataset" --epochs "$epochs")
  local stage2=(rnl-fast train --stage 2 --resume --dataset "$dataset" --epochs "$epochs2" --tolerance 1)
  "${stage1[@]}" --activation relu --out "$out/relu.pt" "$@"
  "${stage1[@]}" --activation rnl --out "$out/rnl.pt" "$@"
  "${stage2[@]}" --from "$out/rnl.pt" --out "$out/rnl_ril.pt" "$@"
  "${stage1[@]}" --activation qcfs --levels "$levels" --out "$out/qcfs.pt" "$@"
  "${stage1[@]}" --activation rnl --levels "$levels" --out "$out/rnl_q.pt" "$@"
  "${stage2[@]}" --from "$out/rnl_q.pt" --out "$out/rnl_qcfs.pt" "$@"
  rnl-fast compare --relu "$out/relu.pt" --rnl "$out/rnl.pt" --rnl-ril "$out/rnl_ril.pt" --qcfs "$out/qcfs.pt" \
    --rnl-qcfs "$out/rnl_qcfs.pt" --dataset "$dataset" -T "$T" --out "$out" "$@"
}

case "$run" in
  mnist_cnn7) pipeline cnn7 mnist 4 2 256 --test-images 2000 ;;
  mnist_alexnet) pipeline alexnet_mnist mnist 1 1 256 --test-images 500 ;;
  fashion_cnn7) pipeline cnn7 fashion_mnist 4 2 256 --test-images 1000 ;;
  fashion_alexnet) pipeline alexnet_mnist fashion_mnist 2 1 256 --test-images 500 ;;
  fashion_vgg16) pipeline vgg16 fashion_mnist 2 1 128 --train-images 12000 --test-images 256 ;;
  # Needs the CIFAR-10 python batches (cifar-10-python.tar.gz from the CIFAR site), extracted:
  cifar10_vgg16) pipeline vgg16 cifar10 200 20 256 --data-dir "${2:?the directory with cifar-10-batches-py}" ;;
  *) echo "unknown run: $run" >&2; exit 2 ;;
esac
