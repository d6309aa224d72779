#!/usr/bin/env bash
# The reduced-budget runs behind the tables of integrations/mosaic/README.md (CPU, 1 torch thread).
# The paper trains 20 epochs on all of MNIST / CIFAR-10 (1 epoch of ImageNet); here every run is
# one or a few epochs on a subset, sized to fit about an hour of a shared 2-core CPU.
# Usage: [OUT=runs/mosaic] bash integrations/mosaic/reduced_budget.sh [part ...]
# Ctrl-C stops the current run (it writes a checkpoint) and the script; running the script again
# skips the finished runs and continues the interrupted one (--resume starts a run where none is).
set -euo pipefail
OUT=${OUT:-runs/mosaic}
M="python -m integrations.mosaic train --threads 1 --resume"
mkdir -p "$OUT/logs"
run() {  # run NAME ARGS...: skip finished runs, log to $OUT/logs/NAME.log
  local name=$1 rc=0; shift
  if [ -f "$OUT/$name/summary.json" ]; then echo "skip $name"; return; fi
  echo "$(date -u +%T) start $name"
  $M "$@" --out "$OUT/$name" > "$OUT/logs/$name.log" 2>&1 || rc=$?
  # 130 / 143: the run was interrupted (SIGINT / SIGTERM) and saved a checkpoint; stop here rather
  # than start the next run, whose classifier may be the interrupted one
  if [ "$rc" -eq 130 ] || [ "$rc" -eq 143 ]; then
    echo "$(date -u +%T) interrupted $name: run the same command again to continue"; exit "$rc"
  fi
  if [ "$rc" -ne 0 ]; then echo "FAILED $name (exit $rc, see $OUT/logs/$name.log)"; fi
  echo "$(date -u +%T) done  $name"
}
parts=${*:-"mnist mnist-classify cifar10 tiny mnist-big cifar10-big tiny-big cifar10-classify"}
for part in $parts; do case $part in
mnist)  # Tables 1 and 4, MNIST 2x2 and 3x3: all 60,000 training images, 1 epoch (paper: 20)
  for n in 2 3; do for m in linassign po-u po-la; do
    run mnist-$n-$m --dataset mnist --tiles $n --permutation $m --epochs 1
  done; done ;;
mnist-classify)  # Tables 2 and 5: ResNet-18 (width 16) pre-trained on 20,000 images for 1 epoch, then
                 # the permutation trained through it on 10,000 images for 1 epoch; 5,000 test images
  for n in 2 3; do
    run mnist-$n-pretrain --task pretrain --dataset mnist --tiles $n --resnet-width 16 --epochs 1 --subset 20000 --test-subset 5000
    for m in linassign po-u po-la; do
      run mnist-$n-classify-$m --task classify --classifier "$OUT/mnist-$n-pretrain" --dataset mnist --tiles $n \
        --permutation $m --epochs 1 --subset 10000 --test-subset 5000
    done
  done ;;
mnist-big)  # Tables 1 and 4, MNIST 4x4 and 5x5: 20,000 training images, 1 epoch
  for n in 4 5; do for m in linassign po-u po-la; do
    run mnist-$n-$m --dataset mnist --tiles $n --permutation $m --epochs 1 --subset 20000
  done; done ;;
cifar10)  # the 4,000 / 1,000-image CIFAR-10 subset of shared/data, 5 epochs
  for n in 2 3; do for m in linassign po-u po-la; do
    run cifar10-$n-$m --dataset cifar10 --tiles $n --permutation $m --epochs 5
  done; done ;;
tiny)  # Tiny ImageNet val as the ImageNet 64x64 stand-in: train on val images 1000-5999, test on 0-999, 1 epoch
  for n in 2 3; do for m in linassign po-u po-la; do
    run tiny-$n-$m --dataset tiny-imagenet --tiles $n --permutation $m --epochs 1 --subset 5000
  done; done ;;
cifar10-big)  # Tables 1 and 4, CIFAR-10 subset 4x4 and 5x5, 5 epochs
  for n in 4 5; do for m in linassign po-u po-la; do
    run cifar10-$n-$m --dataset cifar10 --tiles $n --permutation $m --epochs 5
  done; done ;;
tiny-big)  # Tables 1 and 4, Tiny ImageNet stand-in 4x4 and 5x5, 1 epoch on 5,000 images
  for n in 4 5; do for m in linassign po-u po-la; do
    run tiny-$n-$m --dataset tiny-imagenet --tiles $n --permutation $m --epochs 1 --subset 5000
  done; done ;;
cifar10-classify)  # Tables 2 and 5 on the CIFAR-10 subset: ResNet-18 (width 16) pre-trained 5 epochs on the
                   # 4,000 training images, then the permutation trained through it for 5 epochs
  for n in 2 3; do
    run cifar10-$n-pretrain --task pretrain --dataset cifar10 --tiles $n --resnet-width 16 --epochs 5
    for m in linassign po-u po-la; do
      run cifar10-$n-classify-$m --task classify --classifier "$OUT/cifar10-$n-pretrain" --dataset cifar10 --tiles $n \
        --permutation $m --epochs 5
    done
  done ;;
*) echo "unknown part $part"; exit 2 ;;
esac; done
