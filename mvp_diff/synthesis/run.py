"""Stage 3 orchestration: samples in batches of one pipeline size, each batch generated while writer
threads finish the previous one, across `accelerate launch` processes."""

import threading
import time
from pathlib import Path
from queue import Queue

from ..checkpoint import resolve_checkpoint
from ..errors import UserError
from ..random_boxes import boxes_path
from .inputs import (
    PlannedSample,
    Settings,
    build_samples,
    load_box,
    load_box_records,
    load_good,
    plan_sample,
    select_records,
)
from .model import (
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
from .store import SampleStore

MANIFEST_EVERY = 30.0  # seconds between manifest rewrites during a run
WRITE_WORKERS = 4  # threads finishing samples while the next batch generates (0: in the main thread)


def batches(samples, batch_size, resolution):
    """Lists of samples of the same pipeline size, at most `batch_size` each, in index order."""
    groups = {}
    for s in samples:
        groups.setdefault(processing_size(s.width, s.height, resolution), []).append(s)
    out = []
    for size, group in groups.items():
        for i in range(0, len(group), batch_size):
            out.append((size, group[i : i + batch_size]))
    return sorted(out, key=lambda b: b[1][0].index)


def finish_sample(store: SampleStore, sample: PlannedSample, good, box, generated, settings: Settings, classname, reference=None, pipeline_input=None):
    """Everything after the pipeline call: paste-back, precise mask, the sample's files and entry.
    `reference`: the pipeline input's VAE round trip (see vae_round_trips), or None;
    `pipeline_input`: the (image, box mask) pipeline_inputs gave the generator, or None."""
    image = paste_back(generated, good, box)
    mask = precise_mask(good, box, generated, settings, reference, pipeline_input)
    return store.write_sample(sample, image, mask, box, settings, classname)


class SampleWriter:
    """Runs `finish` (finish_sample) on `workers` threads while the main thread generates the next
    batch: the GPU no longer waits for paste-back, mask extraction, PNG encoding and fsyncs. The
    queue holds at most `max_pending` samples, so a killed run loses only the samples in flight (each
    sample's entry is still written last). The first failure stops the writers and is raised in the
    main thread at its next submit() or at close(). workers=0 finishes each sample in the main thread."""

    def __init__(self, finish, workers=WRITE_WORKERS, max_pending=4):
        self.finish = finish
        self.failure = None  # (sample, exception) of the first failed write
        self.stopping = False  # the main thread stopped: queued samples are dropped
        self.queue = Queue(maxsize=max(1, max_pending))
        self.threads = [threading.Thread(target=self._work, name=f"sample-writer-{i}", daemon=True) for i in range(workers)]
        for thread in self.threads:
            thread.start()

    def _work(self):
        while (job := self.queue.get()) is not None:
            if self.failure is None and not self.stopping:  # after a failure the run stops anyway
                try:
                    self.finish(*job)
                except Exception as err:  # re-raised in the main thread
                    self.failure = self.failure or (job[0], err)

    def submit(self, sample, *args):
        self.check()
        if self.threads:
            self.queue.put((sample, *args))
            return
        try:
            self.finish(sample, *args)
        except Exception as err:
            self.failure = (sample, err)
            self.check()

    def check(self):
        if self.failure is None:
            return
        sample, err = self.failure
        if isinstance(err, UserError):  # a failed atomic write names its file; say which sample and what next
            raise UserError(f"writing sample {sample.defect_type}/{sample.name} failed: {err}; generation stopped; fix that and rerun to resume") from err
        if isinstance(err, OSError):  # disk full, permissions, a file where a folder should be
            raise UserError(f"writing sample {sample.defect_type}/{sample.name} failed ({err.__class__.__name__}: {err}); "
                            f"generation stopped; fix that and rerun to resume") from err
        raise RuntimeError(f"writing sample {sample.defect_type}/{sample.name} failed") from err

    def close(self, drop_pending=False):
        """Wait for the queued samples (or drop them) and stop the threads; raises the first failure."""
        self.stopping = drop_pending
        for _ in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            thread.join()
        if not drop_pending:
            self.check()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(drop_pending=exc_type is not None)


def run_batch(pipe, size, samples, settings: Settings, writer: SampleWriter):
    """Generate one batch and hand each sample to `writer` (which finishes it in the main thread when
    it has no workers)."""
    goods = [load_good(s) for s in samples]
    boxes = [load_box(s) for s in samples]
    inputs = [pipeline_inputs(g, b, size) for g, b in zip(goods, boxes)]
    generated = generate(pipe, [s.prompt for s in samples], [i for i, _ in inputs], [m for _, m in inputs], [s.seed for s in samples], size, settings)
    # The VAE round trips run here, on the pipeline's device; the writer threads only do CPU work.
    references = vae_round_trips(pipe, [i for i, _ in inputs]) if settings.extract_mask else [None] * len(samples)
    for sample, good, box, gen, ref, inp in zip(samples, goods, boxes, generated, references, inputs):
        writer.submit(sample, good, box, gen, ref, inp)


def synthesize(classname, dataset, mask_dir, output, settings: Settings, num=None, device=None, dtype="auto", overwrite=False,
               local_files_only=False, write_workers=WRITE_WORKERS, pipe=None):
    """Generate every selected sample not yet done; returns (PartialState, OUTPUT/CLASS, manifest entries).
    `write_workers` threads finish samples while the next batch generates (0: one after another);
    `pipe`: a pipeline load_pipeline already returned for these settings (benchmarks time runs without loading)."""
    import torch

    from ..dataset import class_dir
    from ..progress import progress_bar

    class_dir(dataset, classname)  # a clear error for an unknown class or dataset
    all_records = load_box_records(mask_dir, classname, dataset)
    records = select_records(all_records, num, boxes_path(mask_dir, classname))
    state, device, torch_dtype = resolve_device(device, dtype)
    hub_variant = "fp16" if torch_dtype == torch.float16 else None  # what a Hub id fetches: half the download in fp16
    settings.checkpoint = str(resolve_checkpoint(settings.checkpoint, "--checkpoint_dir", local_files_only, hub_variant).resolve())
    if settings.lora is not None:
        settings.lora = str(check_lora(settings.lora, classname).resolve())
        settings.lora_sha256 = weights_sha256(lora_file(settings.lora))
    warn = (lambda msg: print(msg, flush=True)) if state.is_main_process else (lambda msg: None)
    samples = build_samples(records, mask_dir, classname, dataset, settings.seeds, warn)
    out_dir = Path(output) / classname
    store = SampleStore(out_dir)
    defect_types = sorted({r["defect_type"] for r in records})
    if state.is_main_process:
        store.prepare(settings, overwrite)
        stale = store.remove_stale([plan_sample(r, mask_dir, classname, dataset, settings.seeds) for r in all_records])
        if stale:
            print(f"removed {stale} earlier sample(s) that {boxes_path(mask_dir, classname)} no longer holds", flush=True)
    state.wait_for_everyone()
    pending = [s for s in samples if not store.is_done(s)]
    state.wait_for_everyone()  # every process has scanned before any writes
    mine = pending[state.process_index :: state.num_processes]
    if state.is_main_process:
        print(f"{len(samples) - len(pending)} of {len(samples)} samples already done; generating {len(pending)} on {state.num_processes} process(es)", flush=True)
    if mine:
        pipe = pipe or load_pipeline(settings.checkpoint, device, torch_dtype, settings.lora, settings.lora_scale)
        bar = progress_bar(total=len(mine), desc=f"inpainting {classname}", disable=not state.is_main_process)
        written = time.monotonic()

        def finish(sample, good, box, generated, reference, pipeline_input):
            finish_sample(store, sample, good, box, generated, settings, classname, reference, pipeline_input)

        with SampleWriter(finish, write_workers, max_pending=settings.batch_size) as writer:
            for size, batch in batches(mine, settings.batch_size, settings.resolution):
                run_batch(pipe, size, batch, settings, writer)
                # The per-sample entries are what resuming relies on; the manifest follows them at most
                # MANIFEST_EVERY seconds late (rewriting it after every batch would cost O(N^2)).
                if state.is_main_process and time.monotonic() - written > MANIFEST_EVERY:
                    store.rebuild_manifest(defect_types)
                    written = time.monotonic()
                bar.update(len(batch))
        bar.close()
    state.wait_for_everyone()
    entries = store.rebuild_manifest(defect_types) if state.is_main_process else []
    return state, out_dir, entries
