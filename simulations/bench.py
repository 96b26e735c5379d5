"""`fedsynth bench`: speed and memory goals as ratios measured in one run on this machine.

Ratios, not seconds, so that they mean the same on a laptop and on a hospital's GPU box.
Networks are built from the config with fresh weights: timing does not depend on them.
Every measure takes a `Bench`: the config and the size of a site (subjects, two volumes
each), by default the simulation's (`phantom-subjects`), and gives a `Figure`
(bench_timing.py): the median of repeated measurements, their spread and how they were
taken. The two sides of a ratio of timings are measured in turn, in adjacent pairs after
a warm-up (`interleaved`), so that a machine whose load changes weighs on both alike.

Scaling figures (issue 15): round time per site with 2, 4 and 8 sites under SecAgg+
(pairs of fresh studies, k sites and 2, interleaved), and a DP step's time (the variant's
step and the config's own, interleaved) and a site's peak memory (measured once each) at
2x and 4x UNet width and at 64x64x16 volumes, each over the same figure at the config's
own size, both measured in this run.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from multiprocessing import get_context
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from fedsynth.client.budget import sample_rate
from fedsynth.client.dp_trainer import train_round
from fedsynth.common.config import Config, apply_overrides, config_from_dict, config_hash, to_dict
from fedsynth.common.diffusion import sample_latents, sampling_scheduler
from fedsynth.common.errors import FedsynthError
from fedsynth.common.models import ConditionedUNet, build_autoencoder, latent_shape, resolve_device
from fedsynth.server.study import DEFAULT_PHANTOM_SUBJECTS
from fedsynth.simulations.bench_steps import dp_step, plain_step
from fedsynth.simulations.bench_steps import site_tensors as _site
from fedsynth.simulations.bench_timing import Figure, interleaved, single, timed_ratio
from fedsynth.simulations.bench_timing import seconds as _seconds
from fedsynth.simulations.flwr_overhead import flwr_run_overhead

OVERHEAD_SITES = 3  # the in-process studies' sites, as `flwr run .` simulates them


@dataclass(frozen=True)
class Bench:
    """What a bench run measures with: the config, and a site of `site_subjects`; the
    in-process studies draw their sites from `sites` phantom sites of that size.
    `repeats`: pairs (or measured rounds) per figure instead of each key's default."""

    config: Config
    site_subjects: int = DEFAULT_PHANTOM_SUBJECTS
    sites: int = OVERHEAD_SITES
    repeats: int | None = None


def _key(bench: Bench) -> tuple[str, int, int]:
    """What a cached figure of a bench depends on."""
    return config_hash(bench.config), bench.site_subjects, bench.sites


def _repeats(bench: Bench, default: int) -> int:
    """The bench's repeats where it names them, else the key's `default`."""
    return default if bench.repeats is None else bench.repeats


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


SAMPLING_PAIRS = 7  # interleaved DDPM/DDIM pairs (default config: about 20 s a pair on a CPU)


def ddim_speedup_over_ddpm(bench: Bench) -> Figure:
    """Wall time of one volume by full DDPM (all training timesteps) over DDIM (sampling.steps),
    both with classifier-free guidance and decoding; SAMPLING_PAIRS interleaved pairs."""
    one_volume = sampler(bench.config, 1)
    return timed_ratio(
        one_volume("ddpm"),
        one_volume("ddim"),
        _repeats(bench, SAMPLING_PAIRS),
        "seconds of one volume by DDPM over DDIM, guided and decoded",
    )


THROUGHPUT_BATCHES = 5  # sampling batches timed (after one warm-up batch)


def sampling_throughput(bench: Bench) -> Figure:
    """Volumes a release samples per second: DDIM with the config's steps and guidance,
    in batches of sampling.batch-size, decoded; one sample per batch, THROUGHPUT_BATCHES
    batches after a warm-up. A 1000-volume release takes about 1000 / this many seconds."""
    sampling = bench.config.sampling
    size = sampling.batch_size
    one_batch = sampler(bench.config, size)(sampling.scheduler)
    one_batch()  # warm-up
    rates = tuple(size / _seconds(one_batch) for _ in range(THROUGHPUT_BATCHES))
    method = (
        f"volumes per second of a DDIM batch of {size}, decoded; one batch per sample "
        "timed by time.perf_counter after a warm-up batch (an absolute figure, no pairs)"
    )
    return Figure(rates, method)


def sampling_volumes_per_second(bench: Bench) -> float:
    """The median of `sampling_throughput`."""
    return sampling_throughput(bench).median


STEP_PAIRS = 9  # interleaved DP/plain step pairs (default config: about 2 s a pair on a CPU)


def _batch_subjects(bench: Bench) -> int:
    """The config's expected batch of subjects at the bench's site."""
    config, size = bench.config, bench.site_subjects
    return max(1, round(sample_rate(config.privacy, size) * size))


_STEPS: dict[tuple[str, int, int], dict] = {}


def measured_steps(bench: Bench) -> dict:
    """One DP-SGD step over one plain step (same trainable subset, mode and batch: the
    config's expected batch of subjects at the bench's site, two volumes each, split
    into physical batches), STEP_PAIRS interleaved pairs (bench_steps.py), once per bench
    in a process: the ratio's `figure` (the median of the pairs' ratios: the bench's
    key), the median seconds of each step (`dp_step_seconds`, `nonprivate_step_seconds`)
    and their ratio (`dp_over_nonprivate`: the device report's, which it shows beside
    them), and what the DP step trains."""
    if _key(bench) not in _STEPS:
        config, subjects = bench.config, _batch_subjects(bench)
        device = resolve_device(config.device)
        with dp_step(config, subjects, device) as dp, plain_step(config, subjects, device) as plain:
            figure = timed_ratio(
                dp.run,
                plain.run,
                _repeats(bench, STEP_PAIRS),
                f"seconds of one DP-SGD step over one plain step, {subjects} subjects",
            )
        dp_seconds = statistics.median(figure.numerators)
        plain_seconds = statistics.median(figure.denominators)
        _STEPS[_key(bench)] = {
            **dp.info,
            "dp_step_seconds": dp_seconds,
            "nonprivate_step_seconds": plain_seconds,
            "dp_over_nonprivate": dp_seconds / plain_seconds,
            "figure": figure,
        }
    return _STEPS[_key(bench)]


def dp_step_over_nonprivate(bench: Bench) -> Figure:
    """One DP-SGD step over one plain step (`measured_steps`)."""
    figure: Figure = measured_steps(bench)["figure"]
    return figure


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


def _measure_and_send(measure: Callable[[Bench], float], bench: Bench, conn: Connection) -> None:
    """In the spawned process: (True, measure(bench)) or (False, the exception) to `conn`."""
    try:
        result: tuple[bool, object] = (True, measure(bench))
    except Exception as exc:  # sent back and raised in the parent
        result = (False, exc)
    try:
        conn.send(result)
    except Exception as exc:  # an exception that does not pickle: its line
        conn.send((False, FedsynthError(f"{type(exc).__name__}: {exc}")))


def in_own_process(measure: Callable[[Bench], float], bench: Bench) -> float:
    """measure(bench) in a fresh (spawned) process: a peak it reads counts nothing else
    this command did. `measure` must be a module-level function. The process is killed
    when this returns by any other way than its result (an exception, a signal's
    `Stopped`), so a stopped bench leaves no measuring process behind."""
    context = get_context("spawn")
    reader, writer = context.Pipe(duplex=False)
    child = context.Process(target=_measure_and_send, args=(measure, bench, writer), daemon=True)
    child.start()
    writer.close()
    try:
        ok, value = reader.recv()
    except EOFError:
        child.join()
        raise FedsynthError(
            f"the bench's measuring process ended without a result (exit code {child.exitcode})"
        ) from None
    except BaseException:  # stopped while it measures: it stops too
        child.kill()
        child.join()
        raise
    finally:
        reader.close()
    child.join()
    if not ok:
        assert isinstance(value, BaseException)
        raise value
    assert isinstance(value, int | float)
    return float(value)


_PEAKS: dict[tuple[str, int, int], float] = {}


def site_peak_memory_mb(bench: Bench) -> float:
    """Peak memory of a site's training round: GPU memory allocated on CUDA, otherwise the
    whole process's resident set (Python, torch and the model included), measured once per
    bench in a process of its own so nothing else this command did counts."""
    if _key(bench) not in _PEAKS:
        _PEAKS[_key(bench)] = in_own_process(_site_round_peak_mb, bench)
    return _PEAKS[_key(bench)]


def _peak_method(bench: Bench) -> str:
    """How `site_peak_memory_mb` measures on the bench's device."""
    if resolve_device(bench.config.device).type == "cuda":
        how = "torch.cuda.max_memory_allocated"
    else:
        how = "the resident set's high-water mark (VmHWM in /proc/self/status)"
    return (
        f"peak memory of one site round of {bench.site_subjects} subjects in a fresh spawned "
        f"process: {how}; measured once (memory does not depend on the machine's load)"
    )


def site_peak_memory(bench: Bench) -> Figure:
    """`site_peak_memory_mb` as a figure (measured once)."""
    return single(site_peak_memory_mb(bench), f"MiB, {_peak_method(bench)}")


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


VARIANT_PAIRS = 5  # interleaved pairs of a wider or larger DP step and the config's own


def _dp_step_over_default(variant: Callable[[Config], Config], name: str, bench: Bench) -> Figure:
    """Seconds of a DP-SGD step (bench_steps.dp_step: the expected batch at the bench's
    site) with the variant config over one with the config, VARIANT_PAIRS interleaved
    pairs, both steps set up side by side."""
    other = replace(bench, config=variant(bench.config))
    device = resolve_device(bench.config.device)
    with (
        dp_step(other.config, _batch_subjects(other), device) as top,
        dp_step(bench.config, _batch_subjects(bench), device) as bottom,
    ):
        return timed_ratio(
            top.run,
            bottom.run,
            _repeats(bench, VARIANT_PAIRS),
            f"seconds of one DP-SGD step {name} over one with the config's own",
        )


def dp_step_width_2x_over_1x(bench: Bench) -> Figure:
    """Seconds of a DP-SGD step at 2x UNet width over 1x."""
    return _dp_step_over_default(lambda c: wider(c, 2), "at 2x UNet width", bench)


def dp_step_width_4x_over_1x(bench: Bench) -> Figure:
    """Seconds of a DP-SGD step at 4x UNet width over 1x."""
    return _dp_step_over_default(lambda c: wider(c, 4), "at 4x UNet width", bench)


def dp_step_64x64x16_over_default(bench: Bench) -> Figure:
    """Seconds of a DP-SGD step on LARGER_VOLUME's latents over the config's own."""
    return _dp_step_over_default(larger_volume, "on 64x64x16 volumes' latents", bench)


def _peak_over_default(variant: Callable[[Config], Config], name: str, bench: Bench) -> Figure:
    """`site_peak_memory_mb` with the variant config over it with the config."""
    other = site_peak_memory_mb(replace(bench, config=variant(bench.config)))
    return single(
        other / site_peak_memory_mb(bench),
        f"{name} over the config's own, each the {_peak_method(bench)}",
    )


def site_peak_memory_width_2x_over_1x(bench: Bench) -> Figure:
    """A site round's peak memory (`site_peak_memory_mb`) at 2x UNet width over 1x."""
    return _peak_over_default(lambda c: wider(c, 2), "at 2x UNet width", bench)


def site_peak_memory_width_4x_over_1x(bench: Bench) -> Figure:
    """A site round's peak memory at 4x UNet width over 1x."""
    return _peak_over_default(lambda c: wider(c, 4), "at 4x UNet width", bench)


def site_peak_memory_64x64x16_over_default(bench: Bench) -> Figure:
    """A site round's peak memory on LARGER_VOLUME's latents over the config's own."""
    return _peak_over_default(larger_volume, "on 64x64x16 volumes' latents", bench)


SUBSET_MODES = {"attention": "hooks", "all": "functorch"}  # the per-sample-gradient mode
# measured fastest for each subset on CPU (docs/benchmarks.md; ghost clipping is not exact
# for two-volume subjects, so it is not a candidate)


def trained_subset(config: Config, subset: str) -> Config:
    """The config with `privacy.trainable` = subset and that subset's mode (SUBSET_MODES)."""
    overrides: dict[str, object] = {
        "privacy.trainable": subset,
        "privacy.grad-sample-mode": SUBSET_MODES[subset],
    }
    return overridden(config, overrides)


def dp_step_over_nonprivate_attention(bench: Bench) -> Figure:
    """`dp_step_over_nonprivate` when the attention blocks and tokens are trained."""
    return dp_step_over_nonprivate(replace(bench, config=trained_subset(bench.config, "attention")))


def dp_step_over_nonprivate_whole_unet(bench: Bench) -> Figure:
    """`dp_step_over_nonprivate` when every UNet weight is trained."""
    return dp_step_over_nonprivate(replace(bench, config=trained_subset(bench.config, "all")))


OVERHEAD_MEASURED = 3  # steady rounds measured per overhead study (rounds 2-4 of 5): its repeats


def _fraction_not_training(round_seconds: float, training_seconds: float) -> float:
    return max(0.0, 1.0 - training_seconds / round_seconds)


@dataclass
class RoundOverhead:
    """The measured rounds of a study (see `round_overhead`): round 2's figures, and the
    round and training seconds of every measured round (round 2 first)."""

    secure: bool
    round_seconds: float  # wall time of round 2 (one full cycle)
    training_seconds: float  # local DP-SGD time in it, summed over sites
    trained_sites: int  # sites that ran DP-SGD in it
    nodes: frozenset[int]  # the sites the grid delivered messages to in it
    stages: frozenset[str]  # SecAgg+ stages the grid delivered during the whole study
    wire_bytes: int  # round 2's messages and replies, all sites, wire format
    steady: tuple[tuple[float, float], ...] = ()  # (round, training) seconds, rounds 2, 3, ...

    @property
    def overhead(self) -> float:
        """Round 2's fraction of wall time not in local DP-SGD."""
        return _fraction_not_training(self.round_seconds, self.training_seconds)

    @property
    def overheads(self) -> tuple[float, ...]:
        """That fraction of every measured round (round 2's alone where no others)."""
        return tuple(_fraction_not_training(*r) for r in self.steady) or (self.overhead,)


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


_ROUNDS: dict[tuple[tuple[str, int, int], bool, bool, int, int], RoundOverhead] = {}


def measured_round(
    bench: Bench,
    secure: bool,
    whole_unet: bool = False,
    sites: int | None = None,
    measured: int = 1,
) -> RoundOverhead:
    """`round_overhead`, run once per (bench, secure, whole_unet, sites, measured) in a
    process: the time and byte figures of one bench run come from the same rounds."""
    key = (_key(bench), secure, whole_unet, bench.sites if sites is None else sites, measured)
    if key not in _ROUNDS:
        _ROUNDS[key] = round_overhead(bench, secure, whole_unet, sites, measured)
    return _ROUNDS[key]


def round_overhead(
    bench: Bench,
    secure: bool,
    whole_unet: bool = False,
    sites: int | None = None,
    measured: int = 1,
) -> RoundOverhead:
    """One study of `measured` + 2 rounds through the real ServerApp loop
    (`run_federation`) and the real ClientApp, with the first `sites` (default: all) of
    the bench's phantom sites delivered in process by a LoopbackGrid (one site after
    another), every site selected each round, validation off; SecAgg+ on or off.

    Measured: rounds 2 to `measured` + 1, each from the grid taking its first message to
    the grid taking the next round's first message, so each holds exactly one of every
    per-round step (server: selection, fit instructions, aggregation, ledger, checkpoint;
    sites: checkpoint load, budget planning, ledger, delta, SecAgg+ masking; and Flower's
    messages) but not round 1's one-time site latent encoding. Training time:
    `train_round`'s own wall time (the DP-SGD loop) at each site in that round, summed,
    read in process (nothing extra is sent); round and training time of a round are read
    in the same round, so their ratio needs no interleaving. Bytes: every message of
    round 2 and its reply in Flower's wire format. `whole_unet`: every UNet tensor
    travels (as before issue 15), not only the trainable subset.
    """
    if measured < 1:
        raise FedsynthError(f"a bench study measures at least one round, got {measured}")
    rounds = measured + 2
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
                "federation.rounds": rounds,
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
    if len(opening) != count * rounds or len(trained) < len(opening):
        raise FedsynthError(
            f"round overhead ({mode}): expected {rounds} rounds of "
            f"{count} trained sites, the grid saw {len(opening)} opening messages "
            f"and {len(trained)} trained rounds"
        )
    steady = []
    for begin, end in itertools.pairwise(starts[1:]):
        in_round = [seconds for when, seconds in trained if begin <= when < end]
        steady.append((end - begin, sum(in_round)))
    begin, end = starts[1], starts[2]
    in_round = [seconds for when, seconds in trained if begin <= when < end]
    in_two = [d for d in grid.deliveries if begin <= d.started < end]
    stages = frozenset(d.stage for d in grid.deliveries if d.stage is not None)
    sent = sum(d.sent_bytes + d.reply_bytes for d in in_two)
    reached = frozenset(d.node_id for d in in_two)
    return RoundOverhead(
        secure, end - begin, sum(in_round), len(in_round), reached, stages, sent, tuple(steady)
    )


def _overhead_study(bench: Bench, secure: bool, whole_unet: bool = False) -> RoundOverhead:
    """The bench's in-process study whose rounds its overhead and byte keys read."""
    measured = _repeats(bench, OVERHEAD_MEASURED)
    return measured_round(bench, secure, whole_unet, measured=measured)


def _overhead_figure(study: RoundOverhead, what: str) -> Figure:
    rounds = len(study.overheads)
    method = (
        f"fraction of a round's wall time not in local DP-SGD, {what}; round and training "
        f"time read in the same round; one sample per steady round: rounds 2-{rounds + 1} "
        f"of one in-process study of {rounds + 2} rounds"
    )
    return Figure(study.overheads, method)


def round_overhead_plain(bench: Bench) -> Figure:
    """Fraction of a round's wall time not spent in local training, plain FedAvg."""
    return _overhead_figure(_overhead_study(bench, secure=False), "plain FedAvg")


def round_overhead_secagg(bench: Bench) -> Figure:
    """Fraction of a round's wall time not spent in local training, with SecAgg+ (the
    trainable subset travels)."""
    return _overhead_figure(_overhead_study(bench, secure=True), "SecAgg+")


def round_overhead_secagg_whole_unet(bench: Bench) -> Figure:
    """`round_overhead_secagg` when every UNet tensor travels and is masked: the cost the
    subset saves."""
    study = _overhead_study(bench, secure=True, whole_unet=True)
    return _overhead_figure(study, "SecAgg+, the whole UNet travelling")


def _flwr_figure(bench: Bench, secure: bool) -> Figure:
    run = flwr_run_overhead(bench.config, secure, bench.site_subjects)
    mode = "SecAgg+" if secure else "plain FedAvg"
    method = (
        f"fraction of a real `flwr run .` round in which no site ran DP-SGD, {mode}; one "
        f"sample per round after the first ({run.rounds} of one run, each from the end of "
        "the round before to its own end)"
    )
    return Figure(run.per_round or (run.overhead,), method)


def round_overhead_flwr_plain(bench: Bench) -> Figure:
    """Fraction of a real `flwr run .` round (the quick start's simulated study, rounds
    after the first) in which no site ran DP-SGD, plain FedAvg (simulations/flwr_overhead.py)."""
    return _flwr_figure(bench, secure=False)


def round_overhead_flwr_secagg(bench: Bench) -> Figure:
    """`round_overhead_flwr_plain` with SecAgg+."""
    return _flwr_figure(bench, secure=True)


SCALING_SITES = (2, 4, 8)  # site counts of the SecAgg+ scaling studies
SCALING_SUBJECTS = 40  # their sites' size at most: 8 sites' DP-SGD in minutes on 2 cores
SCALING_PAIRS = 3  # interleaved pairs of studies (k sites, 2 sites): each is a whole study


def scaling_pool(bench: Bench) -> Bench:
    """The scaling studies' bench: SCALING_SITES[-1] phantom sites of min(bench's site,
    SCALING_SUBJECTS) subjects (one workspace for all)."""
    size = min(bench.site_subjects, SCALING_SUBJECTS)
    return Bench(bench.config, size, SCALING_SITES[-1], bench.repeats)


_SCALING: dict[tuple[tuple[str, int, int], int, int], tuple[Figure, tuple[RoundOverhead, ...]]] = {}


def scaling(bench: Bench, sites: int) -> tuple[Figure, tuple[RoundOverhead, ...]]:
    """Round seconds per site of a SecAgg+ study of `sites` sites over that of a study of
    2 (`scaling_pool`'s first sites; round 2 of each), SCALING_PAIRS interleaved pairs of
    fresh studies; and the `sites`-site studies. Once per (bench, sites) in a process."""
    pool = scaling_pool(bench)
    pairs = _repeats(bench, SCALING_PAIRS)
    key = (_key(pool), sites, pairs)
    if key not in _SCALING:
        studies: list[RoundOverhead] = []

        def per_site(count: int) -> Callable[[], float]:
            def side() -> float:
                study = round_overhead(pool, True, sites=count)
                if count == sites:
                    studies.append(study)
                return study.round_seconds / count

            return side

        method = (
            f"round 2's seconds per site of a SecAgg+ study of {sites} sites over that of a "
            f"study of 2, sites of {pool.site_subjects} subjects; each side a whole "
            "in-process study of 3 rounds, so few pairs"
        )
        figure = interleaved(per_site(sites), per_site(2), pairs, method)
        _SCALING[key] = figure, tuple(studies)
    return _SCALING[key]


def round_per_site_secagg_4_over_2(bench: Bench) -> Figure:
    """A SecAgg+ round's seconds per site with 4 sites over it with 2 (flat: about 1)."""
    return scaling(bench, 4)[0]


def round_per_site_secagg_8_over_2(bench: Bench) -> Figure:
    """A SecAgg+ round's seconds per site with 8 sites over it with 2."""
    return scaling(bench, 8)[0]


def round_overhead_secagg_8_sites(bench: Bench) -> Figure:
    """`round_overhead_secagg` of the 8-site scaling studies (`scaling`): one sample each."""
    studies = scaling(bench, 8)[1]
    method = (
        "fraction of round 2's wall time not in local DP-SGD, SecAgg+, 8 sites; one sample "
        "per 8-site study of round_per_site_secagg_8_over_2"
    )
    return Figure(tuple(s.overhead for s in studies), method)


def _bytes_figure(study: RoundOverhead, what: str) -> Figure:
    method = (
        f"bytes of round 2's messages and replies, all sites, both ways, in Flower's wire "
        f"format, {what}; counted once (a count, not a timing)"
    )
    return single(study.wire_bytes, method)


def round_bytes(bench: Bench) -> Figure:
    """Bytes on the wire in one SecAgg+ round, all sites, both ways (trainable subset)."""
    return _bytes_figure(_overhead_study(bench, secure=True), "the trainable subset")


def round_bytes_whole_unet(bench: Bench) -> Figure:
    """`round_bytes` when every UNet tensor travels."""
    study = _overhead_study(bench, secure=True, whole_unet=True)
    return _bytes_figure(study, "the whole UNet")


MEASURES: dict[str, Callable[[Bench], Figure]] = {
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
    "sampling_volumes_per_second": sampling_throughput,
    "site_peak_memory_mb": site_peak_memory,
    "dp_step_width_2x_over_1x": dp_step_width_2x_over_1x,
    "dp_step_width_4x_over_1x": dp_step_width_4x_over_1x,
    "dp_step_64x64x16_over_default": dp_step_64x64x16_over_default,
    "site_peak_memory_width_2x_over_1x": site_peak_memory_width_2x_over_1x,
    "site_peak_memory_width_4x_over_1x": site_peak_memory_width_4x_over_1x,
    "site_peak_memory_64x64x16_over_default": site_peak_memory_64x64x16_over_default,
}
