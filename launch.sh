#!/usr/bin/env bash
# Recommended commands for sampling with GITS and evaluating the samples.
#
#   bash launch.sh                      # list the sections
#   bash launch.sh cifar10              # every step for one model: grid, search, sweep, t_steps, eval
#   bash launch.sh cifar10 grid         # one step of it (grid | search | sweep | tsteps | eval)
#   DRY_RUN=1 bash launch.sh ms_coco    # print the commands without running them
#   NPROC=8 BATCH=512 bash launch.sh imagenet64 sweep
#
# "num_steps" counts time points: num_steps=7 is 6 steps (6 NFE for ipndm, 12 for heun/dpm).
# Models download on first use into ./src/<dataset_name>/. The offline sections (digits, gmm)
# need no download and run on a laptop CPU in minutes.
set -euo pipefail
cd "$(dirname "$0")"

NPROC=${NPROC:-4}                   # GPUs for torchrun (the paper used 4 A100s)
PORT=${PORT:-22222}
NUM_STEPS=${NUM_STEPS:-7}           # time points for the grid and t_steps examples
SWEEP_STEPS=${SWEEP_STEPS:-4-11}    # num_steps searched once and swept for FID (NFE 3..10 with ipndm)
REFS=${REFS:-./fid-refs}            # reference statistics not hosted by NVlabs go here (see below)
COCO_CAPTIONS=${COCO_CAPTIONS:-./prompts/MS-COCO_val2014_30k_captions.csv}

run() {   # print (quoted, paste-able), then run unless DRY_RUN=1
    printf '+'; printf ' %q' "$@"; printf '\n'
    if [[ "${DRY_RUN:-0}" != 1 ]]; then "$@"; fi
}

# ----------------------------------------------------------------------------------------------
# Per-model recommended settings: solver, schedule and guidance flags, batch for the FID sweep,
# number of images, and the FID reference statistics (EDM datasets: NVlabs' files; the others:
# the GITS authors' Google Drive folder
# https://drive.google.com/drive/folders/1f8qf5qtUewCdDrkExK_Tk5-qC-fNPKpL, downloaded into $REFS,
# or made with `python fid.py ref --data=path/to/dataset --dest=$REFS/<name>.npz`).

EDM_REFS=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs
IPNDM="--solver=ipndm --max_order=4 --schedule_type=polynomial --schedule_rho=7"
GITS="--dp=True --metric=dev --coeff=1.15 --num_steps_tea=61 --solver_tea=ipndm --num_warmup=256"

settings() {
    case "$1" in
    cifar10)    FLAGS="$IPNDM"; GITS_FLAGS="$GITS"; FID_BATCH=256; NUM_IMAGES=50000; REF=$EDM_REFS/cifar10-32x32.npz ;;
    ffhq)       FLAGS="$IPNDM"; GITS_FLAGS="$GITS"; FID_BATCH=256; NUM_IMAGES=50000; REF=$EDM_REFS/ffhq-64x64.npz ;;
    afhqv2)     FLAGS="$IPNDM"; GITS_FLAGS="$GITS"; FID_BATCH=256; NUM_IMAGES=50000; REF=$EDM_REFS/afhqv2-64x64.npz ;;
    imagenet64) FLAGS="$IPNDM"; GITS_FLAGS="$GITS"; FID_BATCH=256; NUM_IMAGES=50000; REF=$EDM_REFS/imagenet-64x64.npz ;;
    lsun_bedroom)                     # consistency-models' EDM network, pixel space 256x256
        FLAGS="$IPNDM"; GITS_FLAGS="$GITS"; FID_BATCH=64; NUM_IMAGES=50000; REF=$REFS/lsun_bedroom-256x256.npz ;;
    imagenet256)                      # ADM with classifier guidance (the classifier lies beside the model)
        FLAGS="--solver=dpmpp --max_order=3 --predict_x0=True --lower_order_final=True --schedule_type=time_uniform --schedule_rho=1 --guidance_type=cg --guidance_rate=1.0"
        GITS_FLAGS="--dp=True --metric=dev --coeff=1.15 --num_steps_tea=61 --solver_tea=ipndm --num_warmup=256"
        FID_BATCH=64; NUM_IMAGES=50000; REF=$REFS/imagenet-256x256.npz ;;
    lsun_bedroom_ldm|ffhq_ldm)        # LDM, VQ-f4 latents, unconditional
        FLAGS="--solver=dpmpp --max_order=3 --predict_x0=False --lower_order_final=True --schedule_type=discrete --schedule_rho=1 --guidance_type=uncond --guidance_rate=1"
        GITS_FLAGS="--dp=True --metric=dev --coeff=1.15 --num_steps_tea=61 --solver_tea=dpmpp --num_warmup=256"
        FID_BATCH=64; NUM_IMAGES=50000
        if [[ "$1" == ffhq_ldm ]]; then REF=$REFS/ffhq-256x256.npz; else REF=$REFS/lsun_bedroom-256x256.npz; fi ;;
    ms_coco)                          # Stable Diffusion v1.5, classifier-free guidance 7.5 (2 passes per NFE)
        FLAGS="--solver=dpmpp --max_order=2 --predict_x0=False --lower_order_final=True --schedule_type=discrete --schedule_rho=1 --guidance_type=cfg --guidance_rate=7.5"
        GITS_FLAGS="--dp=True --metric=dev --coeff=1.20 --num_steps_tea=61 --solver_tea=dpmpp --num_warmup=256"
        FID_BATCH=16; NUM_IMAGES=30000; REF=$REFS/ms_coco-512x512.npz ;;
    *) return 1 ;;
    esac
}

MODELS="cifar10 ffhq afhqv2 imagenet64 lsun_bedroom imagenet256 lsun_bedroom_ldm ffhq_ldm ms_coco"

schedule_file() { echo "schedules/$1_gits.json"; }   # sample.py --save_schedules creates the folder
nfe_dir() { echo "samples/$1/gits_nfe$2"; }

# ----------------------------------------------------------------------------------------------
# Steps for the pretrained models.

grid_seeds() {   # 64 samples, 4 for the 256/512 px models
    case "$1" in lsun_bedroom|imagenet256|lsun_bedroom_ldm|ffhq_ldm|ms_coco) echo 0-3 ;; *) echo 0-63 ;; esac
}

step_grid() {   # a grid image on a GITS schedule searched for this run
    local m=$1 seeds extra=()
    seeds=$(grid_seeds "$m")
    [[ "$m" == ms_coco ]] && extra=(--prompt="a photograph of an astronaut riding a horse")
    run python sample.py --dataset_name="$m" --batch=64 --seeds="$seeds" --grid=True \
        --num_steps="$NUM_STEPS" $FLAGS $GITS_FLAGS "${extra[@]}"
}

step_search() {   # search once, keep the schedules for every num_steps of the sweep
    local m=$1 extra=()
    [[ "$m" == ms_coco ]] && extra=(--prompt_file="$COCO_CAPTIONS")
    run torchrun --standalone --nproc_per_node="$NPROC" --master_port="$PORT" \
        sample.py --dataset_name="$m" --batch="${BATCH:-$FID_BATCH}" --num_steps="$NUM_STEPS" $FLAGS $GITS_FLAGS \
        --save_schedules="$(schedule_file "$m")" --save_num_steps="$SWEEP_STEPS" "${extra[@]}"
}

sweep_points() {   # num_steps of the sweep as a list: 4-11 -> 4 5 ... 11
    local IFS=, part
    for part in $SWEEP_STEPS; do
        if [[ "$part" == *-* ]]; then seq "${part%-*}" "${part#*-}"; else echo "$part"; fi
    done
}

nfe_of() {   # NFE of num_steps for the model's solver (heun and dpm spend 2 per step)
    case "$FLAGS" in *--solver=heun*|*--solver=dpm\ *) echo $(( 2 * ($1 - 1) )) ;; *) echo $(( $1 - 1 )) ;; esac
}

step_sweep() {   # NUM_IMAGES samples for every num_steps, on the saved GITS schedules
    local m=$1 n extra=()
    [[ "$m" == ms_coco ]] && extra=(--prompt_file="$COCO_CAPTIONS")
    for n in $(sweep_points); do
        run torchrun --standalone --nproc_per_node="$NPROC" --master_port="$PORT" \
            sample.py --dataset_name="$m" --batch="${BATCH:-$FID_BATCH}" --seeds="0-$((NUM_IMAGES - 1))" --subdirs=True \
            --num_steps="$n" $FLAGS --schedule_file="$(schedule_file "$m")" \
            --outdir="$(nfe_dir "$m" "$(nfe_of "$n")")" "${extra[@]}"
    done
}

saved_t_steps() {   # the paste-able t_steps for num_steps $2 in schedule file $1 (written by a search)
    if [[ "${DRY_RUN:-0}" == 1 ]]; then   # only a real run writes the file: a placeholder, nothing read
        echo "[...num_steps=$2_from_$1...]"; return
    fi
    python -c "import json,sys; print(json.load(open(sys.argv[1]))['t_steps_text'][sys.argv[2]])" "$1" "$2" 2>/dev/null
}

step_tsteps() {   # the same schedule pasted as an explicit --t_steps list (no search at all)
    local m=$1 t seeds extra=()
    seeds=$(grid_seeds "$m")
    [[ "$m" == ms_coco ]] && extra=(--prompt="a photograph of an astronaut riding a horse")
    if [[ "$m" == cifar10 ]]; then
        t="[80,10.9836,3.8811,1.584,0.5666,0.1698,0.002]"   # the GITS README's 6-step iPNDM schedule
    elif ! t=$(saved_t_steps "$(schedule_file "$m")" "$NUM_STEPS"); then
        echo "no num_steps=$NUM_STEPS schedule in $(schedule_file "$m"); run: bash launch.sh $m search" >&2; return 1
    fi
    run python sample.py --dataset_name="$m" --batch=64 --seeds="$seeds" --grid=True --t_steps="$t" \
        $(echo $FLAGS | sed -E 's/--schedule_(type|rho)=[^ ]+//g') "${extra[@]}"
}

step_eval() {   # FID of every sweep point (and CLIP score for Stable Diffusion)
    local m=$1 n dir
    for n in $(sweep_points); do
        dir=$(nfe_dir "$m" "$(nfe_of "$n")")
        run torchrun --standalone --nproc_per_node="$NPROC" --master_port="$PORT" \
            fid.py calc --images="$dir" --ref="$REF"
        if [[ "$m" == ms_coco ]]; then
            run python clip_score.py calc --images="$dir" --prompts="$COCO_CAPTIONS"
        fi
    done
}

pretrained() {
    local m=$1 step=${2:-all}
    settings "$m"
    case "$step" in
    grid|search|sweep|tsteps|eval) "step_$step" "$m" ;;
    all) step_grid "$m"; step_search "$m"; step_sweep "$m"; step_tsteps "$m"; step_eval "$m" ;;
    *) echo "unknown step '$step'; choose grid, search, sweep, tsteps, eval or all" >&2; exit 2 ;;
    esac
}

# ----------------------------------------------------------------------------------------------
# Offline sections: the analytic models (exact denoisers, no download), on the CPU.

offline() {
    local m=$1 out=samples/$1
    local flags="--solver=ipndm --max_order=4 --schedule_type=polynomial --schedule_rho=7"
    local gits="--dp=True --metric=dev --coeff=1.15 --num_steps_tea=61 --num_warmup=64"
    # Grid of 64 samples, polynomial schedule vs GITS schedule (6 NFE).
    run python sample.py --dataset_name="$m" --seeds=0-63 --grid=True --num_steps=7 $flags --outdir="$out/poly_nfe6"
    run python sample.py --dataset_name="$m" --seeds=0-63 --grid=True --num_steps=7 $flags $gits --outdir="$out/gits_nfe6"
    # Search once for NFE 3..10, then sample 1000 seeds at NFE 5 from the file, with 2 processes.
    run python sample.py --dataset_name="$m" --num_steps=7 $flags $gits \
        --save_schedules="schedules/${m}_gits.json" --save_num_steps=4-11
    run torchrun --standalone --nproc_per_node=2 --master_port="$PORT" sample.py --dataset_name="$m" \
        --seeds=0-999 --batch=250 --num_steps=6 $flags --schedule_file="schedules/${m}_gits.json" --outdir="$out/gits_nfe5"
    # The same NFE-5 schedule pasted as --t_steps.
    local t
    t=$(saved_t_steps "schedules/${m}_gits.json" 6)
    run python sample.py --dataset_name="$m" --seeds=0-63 --grid=True --solver=ipndm --max_order=4 --t_steps="$t" \
        --outdir="$out/tsteps_nfe5"
    # Trajectory regularity (figures + JSON) and the schedule comparison with true errors.
    run python trajectory.py analyze --dataset_name="$m" --seeds=0-31 --solver=ipndm --num_steps=61 \
        --outdir="trajectories/$m"
    run python trajectory.py schedules --dataset_name="$m" --solver=ipndm --num_steps=7 --num_warmup=64 \
        --error_seeds=0-7 --outdir="trajectories/$m"
}

usage() {
    cat <<EOF
Usage: bash launch.sh SECTION [STEP]

Pretrained models (weights download on first use into ./src/<dataset_name>/):
  $MODELS
  STEP: grid    64-image grid (4 for 256/512 px) on a GITS schedule, NFE=$((NUM_STEPS - 1))
        search  GITS search once under torchrun; schedules for num_steps $SWEEP_STEPS -> schedules/<model>_gits.json
        sweep   50k images (30k for ms_coco) per num_steps from that file, under torchrun
        tsteps  a grid with the schedule given as an explicit --t_steps list
        eval    FID of each sweep point (fid.py), and CLIP score for ms_coco (clip_score.py)
        all     every step above, in order [default]

Offline (analytic models, CPU, minutes): digits, gmm
  grid, GITS search + schedule file, 1000 seeds with torchrun, --t_steps, and
  trajectory.py analyze / schedules (figures in trajectories/<model>/)

Environment: NPROC=$NPROC GPUs, BATCH (per-model default), NUM_STEPS=$NUM_STEPS, SWEEP_STEPS=$SWEEP_STEPS,
  REFS=$REFS (FID statistics from the GITS Google Drive folder), COCO_CAPTIONS=$COCO_CAPTIONS,
  DRY_RUN=1 prints the commands only.
EOF
}

case "${1:-}" in
    "" | -h | --help | help | list) usage ;;
    digits | gmm) offline "$1" ;;
    *)
        if settings "$1"; then pretrained "$@"; else echo "unknown section '$1'" >&2; usage >&2; exit 2; fi ;;
esac
