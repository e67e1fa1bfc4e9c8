#!/usr/bin/env bash
# `make demo`: the main job end to end on the bundled fixtures. Two digit classifiers trained from
# different seeds on real MNIST digits are fused with OT and compared with their parents, vanilla
# averaging and the prediction ensemble; then the same for the two BERT sentiment classifiers.
set -euo pipefail
cd "$(dirname "$0")/.."
OTFUSE=".venv/bin/otfuse"
OUT=demo-out
rm -rf "$OUT" && mkdir -p "$OUT"
D=fixtures/digits

echo "== otfuse inspect: what the parents are and whether they can be fused"
$OTFUSE inspect $D/mlp_a.safetensors $D/mlp_b.safetensors

echo "== otfuse fuse: weight-based OT (no data needed), and the vanilla-average baseline"
$OTFUSE fuse $D/mlp_a.safetensors $D/mlp_b.safetensors -o $OUT/mlp_ot.safetensors
$OTFUSE fuse $D/mlp_a.safetensors $D/mlp_b.safetensors -o $OUT/mlp_average.safetensors --align none

echo "== otfuse evaluate: parents, vanilla average, OT fusion and the ensemble on 1,000 held-out digits"
$OTFUSE evaluate $D/mlp_a.safetensors $D/mlp_b.safetensors $OUT/mlp_average.safetensors $OUT/mlp_ot.safetensors \
  --data $D/test.safetensors --ensemble-of 0,1

S=fixtures/sentiment
if [ -d $S/bert_a ]; then
  echo "== the same for two BERT sentiment classifiers (real movie-review snippets), soft alignment"
  $OTFUSE fuse $S/bert_a $S/bert_b -o $OUT/bert_ot --solver sinkhorn --reg 0.02
  $OTFUSE fuse $S/bert_a $S/bert_b -o $OUT/bert_average --align none
  $OTFUSE evaluate $S/bert_a $S/bert_b $OUT/bert_average $OUT/bert_ot --data $S/test.jsonl --ensemble-of 0,1
fi
echo "outputs in $OUT/"
