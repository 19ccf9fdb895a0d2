# Sampling throughput against the sampling batch on a 2-core CPU (the quality matrix's --sample-batch), with
# 1 and 2 torch threads, on a 32 px UNet and a 16 px one the matrix trained, with the matrix paused:
#   bash run.sh <32 px trained pipeline>/unet <16 px trained pipeline>/unet
passes=../cpu-threads/unet_passes.py
cd "$(dirname "$0")"
for trial in 1 2; do
  for batch in 250 125 64 32; do
    echo "-- trial $trial, 32 px, one process"
    python $passes "$1" 1 $((1000 / batch)) $batch
    python $passes "$1" 2 $((1000 / batch)) $batch
  done
  for batch in 250 64; do
    echo "-- trial $trial, 32 px, two 1-thread processes at once"
    python $passes "$1" 1 $((1500 / batch)) $batch & python $passes "$1" 1 $((1500 / batch)) $batch; wait
    echo "-- trial $trial, 16 px, one process"
    python $passes "$2" 1 $((4000 / batch)) $batch
    python $passes "$2" 2 $((4000 / batch)) $batch
  done
done
