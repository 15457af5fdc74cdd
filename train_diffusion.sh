#!/bin/sh
# Stage 2 with `accelerate launch`: the README's training command on NUM_GPUS GPUs (data parallel).
#
#   sh train_diffusion.sh                                  # bottle, 1 GPU
#   NUM_GPUS=4 CLASSNAME=screw sh train_diffusion.sh       # another class on 4 GPUs
#   sh train_diffusion.sh --resume_from_checkpoint latest  # extra flags are passed on (and win)
#
# Environment (defaults in brackets): NUM_GPUS [1], CLASSNAME [bottle], MODEL_NAME [checkpoints/inpainting],
# DATASET [./dataset], SCRIPT_DIR [./script], OUTPUT_DIR [./output], MIXED_PRECISION [fp16; `no` on a
# machine without CUDA], BATCH_SIZE [6], GRAD_ACCUM [4], EPOCHS [1000], LR [1e-07], SEED [0],
# ACCELERATE [accelerate]. The learning rate is scaled by batch x accumulation x processes (--scale_lr),
# so the global batch, not NUM_GPUS, sets the step size.
set -e

NUM_GPUS=${NUM_GPUS:-1}
CLASSNAME=${CLASSNAME:-bottle}
MODEL_NAME=${MODEL_NAME:-checkpoints/inpainting}
DATASET=${DATASET:-./dataset}
SCRIPT_DIR=${SCRIPT_DIR:-./script}
OUTPUT_DIR=${OUTPUT_DIR:-./output}
BATCH_SIZE=${BATCH_SIZE:-6}
GRAD_ACCUM=${GRAD_ACCUM:-4}
EPOCHS=${EPOCHS:-1000}
LR=${LR:-1e-07}
SEED=${SEED:-0}
ACCELERATE=${ACCELERATE:-accelerate}
PYTHON=${PYTHON:-python}
if [ -z "$MIXED_PRECISION" ]; then
    if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        MIXED_PRECISION=fp16
    else
        MIXED_PRECISION=no
    fi
fi

# More than one process: --multi_gpu (DDP). Without CUDA the processes use gloo on the CPU.
MULTI=""
if [ "$NUM_GPUS" -gt 1 ]; then
    MULTI="--multi_gpu"
fi

exec $ACCELERATE launch $MULTI --num_processes "$NUM_GPUS" --num_machines 1 --mixed_precision "$MIXED_PRECISION" --dynamo_backend no \
    "$(dirname "$0")/train_diffusion.py" \
    --pretrained_model_name_or_path "$MODEL_NAME" \
    --train_data_dir "$DATASET/$CLASSNAME" \
    --train_file "$SCRIPT_DIR/$CLASSNAME/${CLASSNAME}_train.jsonl" \
    --train_batch_size "$BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACCUM" --num_train_epochs "$EPOCHS" --checkpointing_steps 500 \
    --learning_rate "$LR" --lr_scheduler constant --seed "$SEED" --validation_epochs 100 \
    --validation_file "$SCRIPT_DIR/$CLASSNAME/${CLASSNAME}_test.jsonl" \
    --output_dir "$OUTPUT_DIR" --prediction_type epsilon --scale_lr --snr_gamma 10 \
    --mixed_precision "$MIXED_PRECISION" \
    "$@"
