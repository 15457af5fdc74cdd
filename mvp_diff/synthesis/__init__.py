"""Stage 3b: inpaint a defect into each random box of a defect-free image, keep every pixel outside the
boxes from the original, extract the precise mask and write an MVTec-layout dataset:

    OUTPUT/CLASS/test/DEFECT/NNN.png                generated image, at the original size and mode
    OUTPUT/CLASS/ground_truth/DEFECT/NNN_mask.png   precise mask (the box with --extract_mask off)
    OUTPUT/CLASS/manifest.jsonl                     one line per sample (schema: `mvp_diff.manifest`)
    OUTPUT/CLASS/coco.json                          COCO instance segmentation of the samples (`coco`)
    OUTPUT/CLASS_boxes/DEFECT/NNN_mask.png          box mask: outside CLASS/, whose only images are
                                                    the MVTec pairs (readers glob every image there)
    OUTPUT/CLASS/.samples/NNN.json                  the sample's manifest entry, written last: a
                                                    sample is done when it exists with its files
    OUTPUT/CLASS/.samples/settings.json             generation settings of the folder

Sample NNN uses the seed `--seeds + NNN` through its own generator, so its image does not depend on
the batch size, the number of processes, or which other samples run.

Modules: `inputs` (settings, box records, the samples to make), `model` (pipeline, generation, masks),
`store` (the output folder: done, write, stale, manifest), `run` (batches, writer threads, processes).
"""

from ..checkpoint import pick_variant
from .inputs import PlannedSample, Settings, build_samples, load_box_records, plan_sample, select_records
from .model import (
    as_rgb,
    check_lora,
    generate,
    load_pipeline,
    lora_file,
    paste_back,
    pipeline_inputs,
    precise_mask,
    processing_size,
    resolve_device,
    vae_round_trips,
    weights_sha256,
)
from .run import WRITE_WORKERS, SampleWriter, batches, finish_sample, run_batch, synthesize
from .store import SAMPLES_DIR, SETTINGS_FILE, SampleStore

__all__ = [
    "PlannedSample", "SAMPLES_DIR", "SETTINGS_FILE", "SampleStore", "SampleWriter", "Settings", "WRITE_WORKERS", "as_rgb", "batches", "build_samples",
    "check_lora", "finish_sample", "generate", "load_box_records", "load_pipeline", "lora_file", "paste_back", "pick_variant", "pipeline_inputs",
    "plan_sample", "precise_mask", "processing_size", "resolve_device", "run_batch", "select_records", "synthesize", "vae_round_trips", "weights_sha256",
]
