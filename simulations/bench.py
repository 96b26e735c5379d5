"""`fedsynth bench`: speed and memory goals as ratios measured in one run on this machine.

Ratios, not seconds, so that they mean the same on a laptop and on a hospital's GPU box.
Networks are built from the config with fresh weights: timing does not depend on them.
Every measure takes a `Bench`: the config and the size of a site (subjects, two volumes
each), by default the simulation's (`phantom-subjects`).

Scaling figures (issue 15): round time per site with 2, 4 and 8 sites under SecAgg+, and a
DP step's time and a site's peak memory at 2x and 4x UNet width and at 64x64x16 volumes,
each over the same figure at the config's own size, both measured in this run (a figure
measured once serves every key that needs it).
"""

from __future__ import annotations

import contextlib
import logging
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import torch

from fedsynth.client.budget import sample_rate
from fedsynth.client.dp_trainer import step_timings, train_round
from fedsynth.common.config import Config, apply_overrides, config_from_dict, config_hash, to_dict
from fedsynth.common.diffusion import sample_latents, sampling_scheduler
from fedsynth.common.errors import FedsynthError
from fedsynth.common.models import ConditionedUNet, build_autoencoder, latent_shape, resolve_device
from fedsynth.server.study import DEFAULT_PHANTOM_SUBJECTS
from fedsynth.simulations.flwr_overhead import flwr_run_overhead

OVERHEAD_SITES = 3  # the in-process studies' sites, as `flwr run .` simulates them


@dataclass(frozen=True)
class Bench:
    """What a bench run measures with: the config, and a site of `site_subjects`; the
    in-process studies draw their sites from `sites` phantom sites of that size."""

    config: Config
    site_subjects: int = DEFAULT_PHANTOM_SUBJECTS
    sites: int = OVERHEAD_SITES


def _key(bench: Bench) -> tuple[str, int, int]:
    """What a cached figure of a bench depends on."""
    return config_hash(bench.config), bench.site_subjects, bench.sites


def _seconds(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def sampler(config: Config, batch: int) -> Callable[[str], Callable[[], object]]:
    """kind ("ddim" or "ddpm") -> a call that samples `batch` volumes with the config's
    steps and guidance and decodes them, on fresh networks of the config."""
    device = resolve_device(config.device)
    unet = ConditionedUNet(config).to(device).eval()
    autoencoder = build_autoencoder(config).to(device).eval()
    attributes = torch.rand(batch, len(config.data.attributes), device=device)
    sampling = config.sampling

    def of_kind(kind: str) -> Callable[[], object]:
        scheduler = sampling_scheduler(config.diffusion, kind, sampling.steps)

        def run() -> object:
            with torch.no_grad():
                latents = sample_latents(
                    unet, scheduler, attributes, latent_shape(config), sampling.guidance_scale
                )
                return autoencoder.decode_stage_2_outputs(latents)

        return run

    return of_kind


def ddim_speedup_over_ddpm(bench: Bench) -> float:
    """Wall time of one volume by full DDPM (all training timesteps) over DDIM (sampling.steps),
    both with classifier-free guidance and decoding."""
    one_volume = sampler(bench.config, 1)
    one_volume("ddim")()  # warm-up
    return _seconds(one_volume("ddpm")) / _seconds(one_volume("ddim"))


THROUGHPUT_BATCHES = 3  # sampling batches timed (after one warm-up batch)


def sampling_volumes_per_second(bench: Bench) -> float:
    """Volumes a release samples per second: DDIM with the config's steps and guidance,
    in batches of sampling.batch-size, decoded; the mean of THROUGHPUT_BATCHES batches
    after a warm-up. A 1000-volume release takes about 1000 / this many seconds."""
    sampling = bench.config.sampling
    size = sampling.batch_size
    one_batch = sampler(bench.config, size)(sampling.scheduler)
    one_batch()  # warm-up
    seconds = sum(_seconds(one_batch) for _ in range(THROUGHPUT_BATCHES))
    return THROUGHPUT_BATCHES * size / seconds


def _site(config: Config, subjects: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random latents and attributes standing in for a site's cache (timing ignores values)."""
    generator = torch.Generator().manual_seed(config.seed)
    latents = torch.randn((2 * subjects, *latent_shape(config)), generator=generator)
    attributes = torch.rand((2 * subjects, len(config.data.attributes)), generator=generator)
    return latents, attributes, torch.arange(subjects).repeat_interleave(2)


_STEPS: dict[tuple[str, int, int], dict] = {}


def measured_steps(bench: Bench) -> dict:
    """`step_timings` (seconds of one DP-SGD step and of one plain step, same model,
    trainable subset and batch) once per bench in a process: the config's expected batch
    of subjects at the bench's site (two volumes each), split into physical batches."""
    if _key(bench) not in _STEPS:
        config, size = bench.config, bench.site_subjects
        subjects = max(1, round(sample_rate(config.privacy, size) * size))
        device = resolve_device(config.device)
        _STEPS[_key(bench)] = step_timings(
            config, ConditionedUNet(config), *_site(config, subjects), repeats=3, device=device
        )
    return _STEPS[_key(bench)]


def dp_step_over_nonprivate(bench: Bench) -> float:
    """One DP-SGD step over one plain step (`measured_steps`)."""
    return measured_steps(bench)["dp_over_nonprivate"]


def _site_round_peak_mb(bench: Bench) -> float:
    """In a fresh process: one local round at the bench's site; peak memory in MiB."""
    config = bench.config
    device = resolve_device(config.device)
    rate = sample_rate(config.privacy, bench.site_subjects)
    unet = ConditionedUNet(config)
    train_round(
        unet,
        *_site(config, bench.site_subjects),
        config,
        1.0,
        rate,
        config.privacy.local_steps,
        seed=config.seed,
        device=device,
    )
    return peak_mb(device)


def peak_mb(device: torch.device) -> float:
    """This process's peak memory in MiB so far: GPU memory allocated on CUDA, otherwise
    the resident set's high-water mark since the process's program started (Linux's
    VmHWM). Not getrusage's ru_maxrss: Linux carries that over from the parent through
    fork and exec, so a spawned child would report a larger parent's peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def in_own_process(measure: Callable[[Bench], float], bench: Bench) -> float:
    """measure(bench) in a fresh (spawned) process: a peak it reads counts nothing else
    this command did. `measure` must be a module-level function."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(measure, bench).result()


_PEAKS: dict[tuple[str, int, int], float] = {}


def site_peak_memory_mb(bench: Bench) -> float:
    """Peak memory of a site's training round: GPU memory allocated on CUDA, otherwise the
    whole process's resident set (Python, torch and the model included), measured once per
    bench in a process of its own so nothing else this command did counts."""
    if _key(bench) not in _PEAKS:
        _PEAKS[_key(bench)] = in_own_process(_site_round_peak_mb, bench)
    return _PEAKS[_key(bench)]


def overridden(config: Config, overrides: dict[str, object]) -> Config:
    """The config with dotted-key overrides, checked as a loaded config is."""
    return config_from_dict(apply_overrides(to_dict(config), overrides))


def wider(config: Config, factor: int) -> Config:
    """The config with every UNet level `factor` times as many channels; channels per
    attention head, norm groups and attribute tokens keep their size (they still divide
    the channels: more heads and wider groups)."""
    return overridden(config, {"unet.channels": [factor * c for c in config.unet.channels]})


LARGER_VOLUME = (64, 64, 16)  # H, W, slices: 8x the default's voxels, the latent's too


def larger_volume(config: Config) -> Config:
    """The config at LARGER_VOLUME; the latent grows with it (`latent_shape`)."""
    return overridden(config, {"data.shape": list(LARGER_VOLUME)})


def _over_default(
    measure: Callable[[Bench], float], variant: Callable[[Config], Config], bench: Bench
) -> float:
    """`measure` at the bench's site with the variant config over it with the config."""
    return measure(replace(bench, config=variant(bench.config))) / measure(bench)


def _dp_step_seconds(bench: Bench) -> float:
    """Seconds of one DP-SGD step (`measured_steps`)."""
    return measured_steps(bench)["dp_step_seconds"]


def dp_step_width_2x_over_1x(bench: Bench) -> float:
    """Seconds of a DP-SGD step (`measured_steps`) at 2x UNet width over 1x."""
    return _over_default(_dp_step_seconds, lambda c: wider(c, 2), bench)


def dp_step_width_4x_over_1x(bench: Bench) -> float:
    """Seconds of a DP-SGD step at 4x UNet width over 1x."""
    return _over_default(_dp_step_seconds, lambda c: wider(c, 4), bench)


def dp_step_64x64x16_over_default(bench: Bench) -> float:
    """Seconds of a DP-SGD step on LARGER_VOLUME's latents over the config's own."""
    return _over_default(_dp_step_seconds, larger_volume, bench)


def site_peak_memory_width_2x_over_1x(bench: Bench) -> float:
    """A site round's peak memory (`site_peak_memory_mb`) at 2x UNet width over 1x."""
    return _over_default(site_peak_memory_mb, lambda c: wider(c, 2), bench)


def site_peak_memory_width_4x_over_1x(bench: Bench) -> float:
    """A site round's peak memory at 4x UNet width over 1x."""
    return _over_default(site_peak_memory_mb, lambda c: wider(c, 4), bench)


def site_peak_memory_64x64x16_over_default(bench: Bench) -> float:
    """A site round's peak memory on LARGER_VOLUME's latents over the config's own."""
    return _over_default(site_peak_memory_mb, larger_volume, bench)


SUBSET_MODES = {"attention": "hooks", "all": "functorch"}  # the per-sample-gradient mode
# measured fastest for each subset on CPU (README *Measured*; ghost clipping is not exact
# for two-volume subjects, so it is not a candidate)


def trained_subset(config: Config, subset: str) -> Config:
    """The config with `privacy.trainable` = subset and that subset's mode (SUBSET_MODES)."""
    overrides = {"privacy.trainable": subset, "privacy.grad-sample-mode": SUBSET_MODES[subset]}
    return overridden(config, overrides)


def dp_step_over_nonprivate_attention(bench: Bench) -> float:
    """`dp_step_over_nonprivate` when the attention blocks and tokens are trained."""
    return dp_step_over_nonprivate(replace(bench, config=trained_subset(bench.config, "attention")))


def dp_step_over_nonprivate_whole_unet(bench: Bench) -> float:
    """`dp_step_over_nonprivate` when every UNet weight is trained."""
    return dp_step_over_nonprivate(replace(bench, config=trained_subset(bench.config, "all")))


OVERHEAD_ROUNDS = 3  # round 1 warms up (site latent encoding), round 2 is measured


@dataclass
class RoundOverhead:
    """One measured round of a study (see `round_overhead`)."""

    secure: bool
    round_seconds: float  # wall time of the measured round (one full cycle)
    training_seconds: float  # local DP-SGD time in it, summed over sites
    trained_sites: int  # sites that ran DP-SGD in it
    nodes: frozenset[int]  # the sites the grid delivered messages to in it
    stages: frozenset[str]  # SecAgg+ stages the grid delivered during the whole study
    wire_bytes: int  # the measured round's messages and replies, all sites, wire format

    @property
    def overhead(self) -> float:
        return max(0.0, 1.0 - self.training_seconds / self.round_seconds)


_WORKSPACES: dict[str, tempfile.TemporaryDirectory] = {}
PUBLIC_SUBJECTS = 4  # the one-step pretraining's public set: its weights do not matter
LATENTS = "latents"  # the workspace's copy of each site's encoded volumes


def _overhead_workspace(bench: Bench) -> Path:
    """The bench's phantom sites and a short public pretraining for its config, made once
    per process in a temporary folder (removed at exit): timing does not depend on how well
    it is trained. Each site's latent cache is kept here after the first study and copied
    into the next studies' fresh state dirs (`_site_state`), so a site encodes once."""
    config = bench.config
    from fedsynth.common.config import load_config, to_yaml
    from fedsynth.server.pretrain import pretrain
    from fedsynth.simulations.phantoms import generate_cohorts

    key = "-".join(map(str, _key(bench)))
    if key not in _WORKSPACES:
        workspace = tempfile.TemporaryDirectory(prefix="fedsynth-bench-")
        root = Path(workspace.name)
        (root / "config.yaml").write_text(to_yaml(config))
        generate_cohorts(
            root / "phantoms",
            bench.sites,
            bench.site_subjects,
            config.seed,
            public_subjects=PUBLIC_SUBJECTS,
            progress=False,
        )
        short = load_config(
            root / "config.yaml", {"training.pretrain-steps": 1, "autoencoder.steps": 1}
        )
        pretrain(short, root / "phantoms" / "public", root / "checkpoint", show_progress=False)
        _WORKSPACES[key] = workspace
    return Path(_WORKSPACES[key].name)


def _copy_latents(source: Path, target: Path) -> None:
    """A site's latent cache files (owner-only, modes kept) from one folder to another."""
    for cache in source.glob("latents-*.pt"):
        shutil.copy2(cache, target / cache.name)


def _site_state(root: Path, tmp: Path, site: int) -> Path:
    """A fresh state dir (its own ledger: the bench's studies do not share a budget)
    holding the site's latent cache when an earlier study of this bench encoded it."""
    state = tmp / "states" / f"site-{site}"
    state.mkdir(parents=True, mode=0o700)
    _copy_latents(root / LATENTS / f"site-{site}", state)
    return state


@contextlib.contextmanager
def _quiet_flower() -> Iterator[None]:
    """Flower's per-stage log lines only at WARNING and above while measuring."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


_ROUNDS: dict[tuple[tuple[str, int, int], bool, bool, int], RoundOverhead] = {}


def measured_round(
    bench: Bench, secure: bool, whole_unet: bool = False, sites: int | None = None
) -> RoundOverhead:
    """`round_overhead`, run once per (bench, secure, whole_unet, sites) in a process: the
    time and byte figures of one bench run come from the same rounds."""
    key = (_key(bench), secure, whole_unet, bench.sites if sites is None else sites)
    if key not in _ROUNDS:
        _ROUNDS[key] = round_overhead(bench, secure, whole_unet, sites)
    return _ROUNDS[key]


def round_overhead(
    bench: Bench, secure: bool, whole_unet: bool = False, sites: int | None = None
) -> RoundOverhead:
    """One study of OVERHEAD_ROUNDS rounds through the real ServerApp loop
    (`run_federation`) and the real ClientApp, with the first `sites` (default: all) of
    the bench's phantom sites delivered in process by a LoopbackGrid (one site after
    another), every site selected each round, validation off; SecAgg+ on or off.

    Measured: round 2, from the grid taking its first message to the grid taking round 3's
    first message, so it holds exactly one of every per-round step (server: selection,
    fit instructions, aggregation, ledger, checkpoint; sites: checkpoint load, budget
    planning, ledger, delta, SecAgg+ masking; and Flower's messages) but not round 1's
    one-time site latent encoding. Training time: `train_round`'s own wall time (the DP-SGD
    loop) at each site in that round, summed, read in process (nothing extra is sent).
    Bytes: every message of that round and its reply in Flower's wire format. `whole_unet`:
    every UNet tensor travels (as before issue 15), not only the trainable subset.
    """
    from flwr.app import Context, RecordDict

    from fedsynth.client.client_app import app
    from fedsynth.client.site_round import observe_site_rounds
    from fedsynth.server.server_app import run_federation
    from fedsynth.server.study import prepare
    from fedsynth.simulations.loopback import LoopbackGrid, task_identity

    config, size = bench.config, bench.site_subjects
    count = bench.sites if sites is None else sites
    if not 2 <= count <= bench.sites:
        raise FedsynthError(f"a bench study needs 2 to {bench.sites} sites, got {count}")
    root = _overhead_workspace(bench)
    mode = "secagg" if secure else "plain"
    with tempfile.TemporaryDirectory(prefix=f"fedsynth-bench-{mode}-") as tmp:
        study = prepare(
            {
                "config": str(root / "config.yaml"),
                "run-dir": str(Path(tmp) / "run"),
                "checkpoint": str(root / "checkpoint"),
                "validation-data": "",
                "secagg-max-weight": size,
                "federation.secure-aggregation": secure,
                "federation.rounds": OVERHEAD_ROUNDS,
                "federation.sites": count,
                "federation.sites-per-round": count,
            }
        )
        nodes = {
            n: {
                "data-path": str(root / "phantoms" / f"site-{n}"),
                "state-dir": str(_site_state(root, Path(tmp), n)),
                "max-epsilon": config.privacy.target_epsilon,
                "site-name": f"site-{n}",
                "require-secure-aggregation": secure,
            }
            for n in range(1, count + 1)
        }
        grid = LoopbackGrid(app, nodes)
        trained: list[tuple[float, float]] = []  # (when observed, DP-SGD seconds)
        observe = lambda update: trained.append((time.perf_counter(), update.result.seconds))  # noqa: E731
        with (
            task_identity(),
            observe_site_rounds(observe),
            contextlib.redirect_stdout(sys.stderr),  # the study's progress lines
            _quiet_flower(),
        ):
            run_federation(grid, study, Context(1, 0, {}, RecordDict(), {}), whole_unet)
        for n in nodes:  # the encoded volumes, for the next study (a fresh ledger each)
            kept = root / LATENTS / f"site-{n}"
            if not kept.is_dir():
                kept.mkdir(parents=True, mode=0o700)
                _copy_latents(Path(tmp) / "states" / f"site-{n}", kept)
    # each round opens with one READY query per site
    opening = [d.started for d in grid.deliveries if d.message_type == "query"]
    starts = opening[::count]
    if len(opening) != count * OVERHEAD_ROUNDS or len(trained) < len(opening):
        raise FedsynthError(
            f"round overhead ({mode}): expected {OVERHEAD_ROUNDS} rounds of "
            f"{count} trained sites, the grid saw {len(opening)} opening messages "
            f"and {len(trained)} trained rounds"
        )
    begin, end = starts[1], starts[2]
    in_round = [seconds for when, seconds in trained if begin <= when < end]
    measured = [d for d in grid.deliveries if begin <= d.started < end]
    stages = frozenset(d.stage for d in grid.deliveries if d.stage is not None)
    sent = sum(d.sent_bytes + d.reply_bytes for d in measured)
    reached = frozenset(d.node_id for d in measured)
    return RoundOverhead(secure, end - begin, sum(in_round), len(in_round), reached, stages, sent)


def round_overhead_plain(bench: Bench) -> float:
    """Fraction of a round's wall time not spent in local training, plain FedAvg."""
    return measured_round(bench, secure=False).overhead


def round_overhead_secagg(bench: Bench) -> float:
    """Fraction of a round's wall time not spent in local training, with SecAgg+ (the
    trainable subset travels)."""
    return measured_round(bench, secure=True).overhead


def round_overhead_secagg_whole_unet(bench: Bench) -> float:
    """`round_overhead_secagg` when every UNet tensor travels and is masked: the cost the
    subset saves."""
    return measured_round(bench, secure=True, whole_unet=True).overhead


def round_overhead_flwr_plain(bench: Bench) -> float:
    """Fraction of a real `flwr run .` round (the quick start's simulated study, rounds
    after the first) in which no site ran DP-SGD, plain FedAvg (simulations/flwr_overhead.py)."""
    return flwr_run_overhead(bench.config, False, bench.site_subjects).overhead


def round_overhead_flwr_secagg(bench: Bench) -> float:
    """`round_overhead_flwr_plain` with SecAgg+."""
    return flwr_run_overhead(bench.config, True, bench.site_subjects).overhead


SCALING_SITES = (2, 4, 8)  # site counts of the SecAgg+ scaling studies
SCALING_SUBJECTS = 40  # their sites' size at most: 8 sites' DP-SGD in minutes on 2 cores


def _scaling_round(bench: Bench, sites: int) -> RoundOverhead:
    """The measured SecAgg+ round of a study of `sites` sites, drawn from SCALING_SITES[-1]
    phantom sites of min(bench's site, SCALING_SUBJECTS) subjects (one workspace for all)."""
    size = min(bench.site_subjects, SCALING_SUBJECTS)
    return measured_round(Bench(bench.config, size, SCALING_SITES[-1]), True, sites=sites)


def _round_per_site_over_2(bench: Bench, sites: int) -> float:
    """Round seconds per site with `sites` sites over it with 2 (`_scaling_round`)."""
    many, two = _scaling_round(bench, sites), _scaling_round(bench, 2)
    return (many.round_seconds / sites) / (two.round_seconds / 2)


def round_per_site_secagg_4_over_2(bench: Bench) -> float:
    """A SecAgg+ round's seconds per site with 4 sites over it with 2 (flat: about 1)."""
    return _round_per_site_over_2(bench, 4)


def round_per_site_secagg_8_over_2(bench: Bench) -> float:
    """A SecAgg+ round's seconds per site with 8 sites over it with 2."""
    return _round_per_site_over_2(bench, 8)


def round_overhead_secagg_8_sites(bench: Bench) -> float:
    """`round_overhead_secagg` of the 8-site scaling study (`_scaling_round`)."""
    return _scaling_round(bench, 8).overhead


def round_bytes(bench: Bench) -> float:
    """Bytes on the wire in one SecAgg+ round, all sites, both ways (trainable subset)."""
    return float(measured_round(bench, secure=True).wire_bytes)


def round_bytes_whole_unet(bench: Bench) -> float:
    """`round_bytes` when every UNet tensor travels."""
    return float(measured_round(bench, secure=True, whole_unet=True).wire_bytes)


MEASURES: dict[str, Callable[[Bench], float]] = {
    "ddim_speedup_over_ddpm": ddim_speedup_over_ddpm,
    "dp_step_over_nonprivate": dp_step_over_nonprivate,
    "dp_step_over_nonprivate_attention": dp_step_over_nonprivate_attention,
    "dp_step_over_nonprivate_whole_unet": dp_step_over_nonprivate_whole_unet,
    "round_overhead_plain": round_overhead_plain,
    "round_overhead_secagg": round_overhead_secagg,
    "round_overhead_secagg_whole_unet": round_overhead_secagg_whole_unet,
    "round_overhead_flwr_plain": round_overhead_flwr_plain,
    "round_overhead_flwr_secagg": round_overhead_flwr_secagg,
    "round_bytes": round_bytes,
    "round_bytes_whole_unet": round_bytes_whole_unet,
    "round_per_site_secagg_4_over_2": round_per_site_secagg_4_over_2,
    "round_per_site_secagg_8_over_2": round_per_site_secagg_8_over_2,
    "round_overhead_secagg_8_sites": round_overhead_secagg_8_sites,
    "sampling_volumes_per_second": sampling_volumes_per_second,
    "site_peak_memory_mb": site_peak_memory_mb,
    "dp_step_width_2x_over_1x": dp_step_width_2x_over_1x,
    "dp_step_width_4x_over_1x": dp_step_width_4x_over_1x,
    "dp_step_64x64x16_over_default": dp_step_64x64x16_over_default,
    "site_peak_memory_width_2x_over_1x": site_peak_memory_width_2x_over_1x,
    "site_peak_memory_width_4x_over_1x": site_peak_memory_width_4x_over_1x,
    "site_peak_memory_64x64x16_over_default": site_peak_memory_64x64x16_over_default,
}
