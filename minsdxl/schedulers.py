"""Noise schedules and update rules as diffusers has them: Euler, Euler a, Heun, DPM2 (a), LMS, DDIM, DPM++ 2M,
3M, singlestep 2S, 3S and their SDE variants, DPM++ SDE (Brownian-tree noise), UniPC, DEIS, LCM, TCD, and EDM
Euler and EDM DPM++ (Playground v2.5, CosXL). Where diffusers' class takes them, the σ follow its Karras,
exponential or beta schedules (use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas; names "_karras",
"_exponential", "_beta").

Each scheduler is built from a diffusers `scheduler_config.json` dict (missing keys take the defaults of the
matching diffusers class, as `from_config` does) and reproduces that class's timesteps, sigmas and `step`.
The sampler uses only this interface:

    s = make_scheduler("euler", config)      # or None: the config's _class_name
    s.set_timesteps(30)                      # fills s.timesteps, s.sigmas, s.init_noise_sigma
    ts = s.select_timesteps(strength=0.3)    # img2img / inpaint / refiner / base cut-offs (optional)
    x = s.add_noise(x0, noise, ts[:1])       # img2img start
    for t in ts:
        eps = unet(s.scale_model_input(x, t), t, ...)
        x = s.step(eps, t, x, generator)

Like diffusers once a pipeline called `set_begin_index`, a scheduler counts its own steps, so `t` is never
looked up (a GPU `t` costs no host sync); a CPU `t` is checked against the step the scheduler is at.
All per-step scalars are precomputed in `set_timesteps` as float32 CPU tables; `step` indexes them, so each
scalar is a CPU 0-d tensor exactly as in diffusers (this matters in fp16: in `c * x` PyTorch rounds a 0-d
tensor `c` to fp16 first but not a Python float) and nothing in `step` waits on the GPU. LMS's weights are
Python floats, as diffusers' are, computed in `step` from the CPU σ table.

Euler and Euler a keep the sample as x0 + σ·noise (k-diffusion's σ-space); DDIM, DPM++, UniPC and DEIS keep it as
√ᾱ·x0 + √(1-ᾱ)·noise, which is why their `init_noise_sigma` is 1 and `scale_model_input` is the identity.
The EDM schedulers (EDM-trained models: no betas, σ from sigma_min to sigma_max) keep it in σ-space too, but
with Karras et al.'s preconditioning: the UNet sees c_in·x and the timestep 0.25·log σ, and x0 = c_skip·x +
c_out·output, with c_in, c_skip, c_out from σ and the config's sigma_data.
"""

import math

import numpy as np
import torch

from minsdxl.rng import BrownianInterval, randn

# diffusers loaders/single_file_utils.py SCHEDULER_DEFAULT_CONFIG, plus what SDXL's own scheduler_config.json
# adds (stabilityai/stable-diffusion-xl-base-1.0 and the refiner ship the same file).
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# __init__ defaults shared by the diffusers classes (Heun's betas aside): what a key missing from the config means
_COMMON_DEFAULTS = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
    prediction_type="epsilon",
    timestep_spacing="linspace",
    steps_offset=0,
    sigma_min=None,  # the Karras / exponential / beta σ range's override; diffusers reads it whenever the config has it
    sigma_max=None,
    rescale_betas_zero_snr=False,
)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose last ᾱ is 0, i.e. pure noise at t = T (arXiv:2305.08891 Algorithm 1; = diffusers'
    rescale_zero_terminal_snr): sqrt(ᾱ) shifted to end at 0 and scaled to keep its first value."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    bar = root**2
    return 1 - torch.cat([bar[0:1], bar[1:] / bar[:-1]])


def _choice(cfg, key, options):
    if cfg[key] not in options:
        raise ValueError(f"scheduler config {key}={cfg[key]!r} is not supported; use one of {list(options)}")
    return cfg[key]


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _sigma_to_t(sigmas, log_sigmas):
    """Fractional training timestep of each sigma, interpolating in log σ (= diffusers `_sigma_to_t`)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


# diffusers' σ schedules other than σ_train at the spaced timesteps: the name suffix that pins each -> its config key
SIGMA_SCHEDULES = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}


def _schedule_sigmas(kind, sigma_min, sigma_max, n):
    """n float64 σ from sigma_max down to sigma_min: Karras et al.'s ρ = 7 ramp, even steps in log σ, or
    sigma_min + q·(sigma_max - sigma_min) at the Beta(0.6, 0.6) quantiles q of 1 .. 0 (arXiv:2407.12173, A1111's
    "Beta") (= diffusers' _convert_to_karras, _convert_to_exponential, _convert_to_beta)."""
    lo, hi = sigma_min, sigma_max
    if kind == "karras":
        ramp = np.linspace(0, 1, n)
        return (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    if kind == "exponential":
        return np.exp(np.linspace(math.log(hi), math.log(lo), n))
    return np.array([lo + beta_ppf(float(q), 0.6, 0.6) * (hi - lo) for q in 1 - np.linspace(0, 1, n)])


def _log_beta(a, b):
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _beta_cdf(x, a, b):
    """I_x(a, b), the regularized incomplete beta function, for 0 < x < 1: its continued fraction (DLMF 8.17.22)
    by the modified Lentz method where that converges fast, x < (a + 1) / (a + b + 2), else 1 - I_{1-x}(b, a)."""
    if x > (a + 1) / (a + b + 2):
        return 1 - _beta_cdf(1 - x, b, a)

    def nonzero(v):  # Lentz's guard against a zero denominator
        return v if abs(v) > 1e-300 else 1e-300

    c, d = 1.0, 1 / nonzero(1 - (a + b) * x / (a + 1))
    fraction = d
    for m in range(1, 1000):
        for coef in (  # the numerators d_2m and d_2m+1
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d, c = 1 / nonzero(1 + coef * d), nonzero(1 + coef / c)
            fraction *= c * d
        if abs(c * d - 1) <= 2**-52:  # the last factor is 1 to the ulp
            break
    return math.exp(a * math.log(x) + b * math.log1p(-x) - _log_beta(a, b)) * fraction / a


def beta_ppf(p: float, a: float, b: float) -> float:
    """The quantile of the Beta(a, b) distribution: the x in [0, 1] with I_x(a, b) = p (= scipy.stats.beta.ppf,
    within 1.6e-15 at a = b = 0.6, 3.5e-15 at 0.1: tests; diffusers' beta σ without scipy). Newton's method on
    I_x - p from the small-x approximation I_x ≈ x^a / (a·B(a, b)), bisecting where a step would leave the
    bracket that the signs of I_x - p narrow; for p > 1/2 the same from the other end, x(p; a, b) =
    1 - x(1 - p; b, a), so each tail is solved near 0."""
    if p <= 0 or p >= 1:
        return float(p >= 1)
    if p > 0.5:
        return 1 - beta_ppf(1 - p, b, a)
    log_beta = _log_beta(a, b)
    lo, hi = 0.0, 1.0
    x = min(math.exp((math.log(a * p) + log_beta) / a), 0.5)
    for _ in range(200):
        if x == 0:  # the root lies below the smallest double
            return x
        f = _beta_cdf(x, a, b) - p
        if f == 0:
            return x
        lo, hi = (x, hi) if f < 0 else (lo, x)
        density = math.exp((a - 1) * math.log(x) + (b - 1) * math.log1p(-x) - log_beta)
        x_new = x - f / density
        if not lo < x_new < hi:
            x_new = (lo + hi) / 2
        if abs(x_new - x) <= 2**-52 * x:
            return x_new
        x = x_new
    return x


def cut_timesteps(
    timesteps,
    num_inference_steps,
    order=1,
    num_train_timesteps=1000,
    strength=1.0,
    denoising_start=None,
    denoising_end=None,
):
    """The part of `timesteps` a run executes, and the index of its first step in `timesteps`.

    = diffusers StableDiffusionXLImg2ImgPipeline.get_timesteps (inpaint's is identical) followed by the
    `denoising_end` filter of the pipelines' __call__. `strength` (img2img/inpaint) keeps the last
    int(N·strength) steps; `denoising_start` (refiner) keeps the timesteps below (1-start)·T and then
    ignores `strength`, as diffusers does; `denoising_end` (base) drops the timesteps below (1-end)·T.
    """
    T = num_train_timesteps
    if not _is_number(strength) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
    for name, v in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if v is not None and (not _is_number(v) or not 0 < v < 1):
            raise ValueError(f"{name} must be a fraction in (0, 1) or None, got {v!r}")
    if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
        raise ValueError(f"denoising_start={denoising_start} must be below denoising_end={denoising_end}")

    if denoising_start is None:
        n = min(int(num_inference_steps * strength), num_inference_steps)
        begin = (num_inference_steps - n) * order
        if n < 1:
            raise ValueError(
                f"strength={strength} of {num_inference_steps} steps runs int({num_inference_steps}*{strength})=0"
                " steps; raise strength or num_inference_steps"
            )
    else:
        cutoff = int(round(T - denoising_start * T))
        n = int((timesteps < cutoff).sum())
        if order == 2 and n % 2 == 0:
            n += 1  # a 2nd-order step spans two timesteps: never start between them (get_timesteps)
        begin = len(timesteps) - n
        if n < 1:
            raise ValueError(
                f"denoising_start={denoising_start} leaves no timestep below {cutoff}; lower it or raise"
                " num_inference_steps"
            )
    timesteps = timesteps[begin:]
    if denoising_end is not None:
        cutoff = int(round(T - denoising_end * T))
        timesteps = timesteps[: int((timesteps >= cutoff).sum())]
        if len(timesteps) == 0:
            raise ValueError(
                f"denoising_end={denoising_end} leaves no timestep at or above {cutoff}; raise it or raise"
                " num_inference_steps"
            )
    return timesteps, begin


class Scheduler:
    """What all share: config, betas, timestep spacing, the sigma table, step counting, add_noise."""

    name = ""
    order = 1  # diffusers' scheduler.order: 2 only for Heun-like schedulers whose timesteps repeat
    defaults: dict = {}  # this diffusers class's __init__ defaults beyond _COMMON_DEFAULTS
    fixed: dict = {}  # this class's options minsdxl implements at one value only
    forced: dict = {}  # config keys this diffusers class ignores: their effective value
    extra_point = 0  # DPM-Solver spaces N+1 points and drops the last
    custom: tuple = ()  # which custom schedules this diffusers class's set_timesteps takes
    integer_timesteps = False  # DDIM and DPM-Solver round "linspace" timesteps to integers
    timestep_dtype = np.float32  # of the spaced timesteps the σ are interpolated at (DPM++ SDE: float64)
    takes_eta = False  # step(..., eta=): the pipelines pass their eta to such a step (prepare_extra_step_kwargs)
    karras_in_name = False  # the instance's name says "_karras" when its sigmas are (dpm2_karras, lms_karras)
    sigma_schedules: tuple = ()  # which of SIGMA_SCHEDULES this diffusers class's set_timesteps takes
    karras_range_from_config = True  # its Karras σ span the config's sigma_min / sigma_max where set (not LMS's)
    final_sigma_is_last = False  # final_sigmas_type "sigma_min" after such a schedule: its last σ (UniPC, DEIS)
    edm = False  # an EDM scheduler: σ from the config's range, no betas (see _EDM)
    # the classes whose diffusers twin takes rescale_betas_zero_snr: the last ᾱ they then use (None: refused)
    zero_snr_last: float | None = None

    def __init__(self, config: dict | None = None):
        keys = {SIGMA_SCHEDULES[kind]: False for kind in self.sigma_schedules}
        cfg = {**_COMMON_DEFAULTS, **keys, **self.defaults, **(config or SDXL_SCHEDULER_CONFIG), **self.forced}
        if cfg["rescale_betas_zero_snr"] and self.zero_snr_last is None and not self.edm:
            raise ValueError(
                f"{type(self).__name__}: scheduler config rescale_betas_zero_snr=True (zero terminal SNR, for "
                "v-prediction models) is not supported by this scheduler (diffusers' neither: it ignores the key); "
                "use euler, euler_a, ddim, dpmpp_2m(_sde, _karras, 3m), unipc, lcm or tcd"
            )
        for key, value in self.fixed.items():
            if cfg.get(key, value) != value:
                raise ValueError(
                    f"{type(self).__name__}: scheduler config {key}={cfg[key]!r} is not supported by minsdxl"
                    f" (only {value!r}); remove it from the config or pick another scheduler"
                )
        _choice(cfg, "prediction_type", ("epsilon", "v_prediction"))
        _choice(cfg, "timestep_spacing", ("leading", "trailing", "linspace"))
        if "final_sigmas_type" in self.defaults:
            _choice(cfg, "final_sigmas_type", ("zero", "sigma_min"))
        self.config = cfg
        self.sigma_schedule = self._sigma_schedule_of(cfg)  # None, "karras", "exponential" or "beta"
        if self.edm:  # no betas: the schedule is sigma_min..sigma_max, Karras's ρ ramp or exponential
            for key in ("sigma_min", "sigma_max", "sigma_data", "rho"):
                if not _is_number(cfg[key]) or cfg[key] <= 0:
                    raise ValueError(f"{type(self).__name__}: scheduler config {key}={cfg[key]!r} must be a number > 0")
            self.karras = _choice(cfg, "sigma_schedule", ("karras", "exponential")) == "karras"
            self.sigma_schedule = "karras" if self.karras else None  # (its exponential is the EDM classes' own)
        else:
            T = cfg["num_train_timesteps"]
            if cfg["trained_betas"] is not None:
                betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
            elif _choice(cfg, "beta_schedule", ("scaled_linear", "linear")) == "scaled_linear":
                betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, T, dtype=torch.float32) ** 2
            else:
                betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], T, dtype=torch.float32)
            if cfg["rescale_betas_zero_snr"]:
                betas = rescale_zero_terminal_snr(betas)
            self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
            if cfg["rescale_betas_zero_snr"]:  # σ_T = sqrt((1 - ᾱ) / ᾱ) stays finite where the class needs it
                self.alphas_cumprod[-1] = self.zero_snr_last
            # σ of each training timestep, float32 as diffusers computes it
            self.train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
            self.karras = self.sigma_schedule == "karras"
        self.name = type(self).name + self._schedule_suffix()
        self.v_prediction = cfg["prediction_type"] == "v_prediction"
        self.timesteps = self.sigmas = self.num_inference_steps = None
        self.init_noise_sigma = 1.0
        self.step_index = self.begin_index = 0

    def _sigma_schedule_of(self, cfg):
        """The σ schedule the config's use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas turn on, or
        None. At most one (diffusers' __init__ raises too); exponential and beta are refused where diffusers'
        class has no such key (it would ignore it); Karras there is ignored, as it always was."""
        on = [kind for kind, key in SIGMA_SCHEDULES.items() if cfg.get(key)]
        for kind in on:
            if kind != "karras" and kind not in self.sigma_schedules:
                takes = [name for name in SCHEDULERS if name.endswith("_" + kind)]
                raise ValueError(
                    f"{type(self).__name__}: scheduler config {SIGMA_SCHEDULES[kind]}=True is not supported by this "
                    f"scheduler (diffusers' {_diffusers_name(type(self))} has no {kind} sigmas: it ignores the key);"
                    f" use one that takes it: {takes}"
                )
        on = [kind for kind in on if kind in self.sigma_schedules]
        if len(on) > 1:
            raise ValueError(
                f"{type(self).__name__}: scheduler config sets {' and '.join(SIGMA_SCHEDULES[k] for k in on)}: at most "
                "one of use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas may be True (as in diffusers)"
            )
        return on[0] if on else None

    def _schedule_suffix(self):
        """The name's ending for the σ schedule: "_exponential", "_beta", and "_karras" where the names say it."""
        kind = self.sigma_schedule
        return "" if kind is None or (kind == "karras" and not self.karras_in_name) else "_" + kind

    # --- timesteps ----------------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, timesteps=None, sigmas=None):
        """The schedule: `num_inference_steps` spaced as the config says, or a custom one (= diffusers'
        retrieve_timesteps): `timesteps` (Euler, DPM++ 2M; not with Karras sigmas), or `sigmas` (Euler:
        one more than the steps, the last being where the run ends, usually 0; e.g. "Align Your Steps")."""
        T = self.config["num_train_timesteps"]
        given = [
            k
            for k, v in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps), ("sigmas", sigmas))
            if v is not None
        ]
        if len(given) != 1:
            raise ValueError(f"pass exactly one of num_inference_steps, timesteps or sigmas, got {given or 'none'}")
        if num_inference_steps is not None:
            if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool):
                raise TypeError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
            if not 1 <= num_inference_steps <= T:
                raise ValueError(
                    f"num_inference_steps must be between 1 and {T} (the model's training steps), "
                    f"got {num_inference_steps}"
                )
            spaced, sigmas = self._schedule(self._spaced_timesteps(num_inference_steps), num_inference_steps)
        else:
            values = timesteps if timesteps is not None else sigmas
            spaced, sigmas = self._custom(given[0], values)
            num_inference_steps = len(values) - (given[0] == "sigmas")  # what diffusers counts as the steps
        # "trailing" can space N+1 timesteps for N steps (and Heun runs 2N-1): diffusers still counts N
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(spaced.astype(np.float32))
        self.sigmas = torch.from_numpy(sigmas.astype(np.float32))
        self._precompute()
        self._start(0)

    def _custom(self, kind, values):
        """A caller's `timesteps` or `sigmas` -> (timesteps, sigmas), as this diffusers class's set_timesteps."""
        scheduled = tuple("_" + k for k in SIGMA_SCHEDULES)  # (their timesteps are refused, their σ overridden)
        takes = [name for name, (cls, _) in SCHEDULERS.items() if kind in cls.custom and not name.endswith(scheduled)]
        if kind not in self.custom:
            raise ValueError(
                f"the {self.name} scheduler takes no custom {kind} (diffusers' {type(self).__name__} neither); use "
                f"one that does: {takes}, or num_inference_steps"
            )
        if kind == "timesteps" and self.sigma_schedule:
            raise ValueError(
                f"custom timesteps cannot be combined with {self.sigma_schedule.capitalize()} sigmas (as in "
                f"diffusers): pass sigmas= instead, or a scheduler without {self.sigma_schedule.capitalize()} sigmas"
            )
        try:
            x = np.asarray(values.cpu() if torch.is_tensor(values) else values, dtype=np.float64)
        except (TypeError, ValueError):
            x = np.array([np.nan])
        T, least = self.config["num_train_timesteps"], 1 if kind == "timesteps" else 2
        if x.ndim != 1 or len(x) < least or not np.isfinite(x).all():
            raise ValueError(f"{kind} must be a list of at least {least} finite numbers, got {values!r}")
        if kind == "timesteps":
            if x.min() < 0 or x.max() > T - 1:
                raise ValueError(f"timesteps must lie in [0, {T - 1}] (the model's training steps), got {values!r}")
            # DPM-Solver casts them to int64 first (a fraction is dropped), Euler keeps float32
            x = (x.astype(np.int64) if self.integer_timesteps else x).astype(np.float32)
            return self._schedule(x, len(x))  # no σ schedule (refused above): σ interpolated at them
        if x.min() < 0:
            raise ValueError(f"sigmas must be >= 0, got {values!r}")
        s = x.astype(np.float32)  # the run ends at the last σ: no final σ appended
        return _sigma_to_t(s[:-1], np.log(self.train_sigmas)), s

    def _spaced_timesteps(self, n):
        """diffusers' three spacings (Table 2 of arXiv:2305.08891), with each class's own rounding."""
        cfg, T, m = self.config, self.config["num_train_timesteps"], n + self.extra_point
        if cfg["timestep_spacing"] == "leading":
            t = (np.arange(m) * (T // m)).round()[::-1][:n] + cfg["steps_offset"]
        elif cfg["timestep_spacing"] == "trailing":
            t = np.arange(T, 0, -T / n).round() - 1  # can hold n+1 points (e.g. n=61): diffusers keeps them
        else:
            t = np.linspace(0, T - 1, m)
            t = (t.round() if self.integer_timesteps else t)[::-1][:n]
        return t.astype(self.timestep_dtype)

    def _sigma_schedule(self, timesteps, n, sigma_range, round_karras=False):
        """The sigma table of every VP class but DDIM, LCM and TCD: σ_train linearly interpolated at `timesteps`,
        or the config's σ schedule (_schedule_sigmas) over `sigma_range` (σ_min, σ_max; the config's sigma_min /
        sigma_max win) with the timesteps mapped back through log σ, Karras's rounded where `round_karras` says,
        an integer-timestep class's truncated (its int64 cast); then the final σ appended: 0, or for
        final_sigmas_type "sigma_min" σ_train[0] (UniPC's and DEIS's after a schedule: its last σ again).
        = diffusers' set_timesteps with _convert_to_karras / _convert_to_exponential / _convert_to_beta."""
        cfg, train, kind = self.config, self.train_sigmas, self.sigma_schedule
        final_sigma = train[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        if kind is None:
            return timesteps, np.append(np.interp(timesteps, np.arange(len(train)), train), final_sigma)
        override = kind != "karras" or self.karras_range_from_config
        lo = cfg["sigma_min"] if override and cfg["sigma_min"] is not None else float(sigma_range[0])
        hi = cfg["sigma_max"] if override and cfg["sigma_max"] is not None else float(sigma_range[1])
        sigmas = _schedule_sigmas(kind, lo, hi, n)
        timesteps = _sigma_to_t(sigmas, np.log(train))
        if kind == "karras" and round_karras:
            timesteps = timesteps.round()
        elif self.integer_timesteps:
            timesteps = np.trunc(timesteps)
        if self.final_sigma_is_last and cfg["final_sigmas_type"] == "sigma_min":
            final_sigma = sigmas[-1]
        return timesteps, np.append(sigmas, final_sigma)

    def select_timesteps(self, strength=1.0, denoising_start=None, denoising_end=None) -> torch.Tensor:
        """The timesteps to run after img2img `strength`, refiner `denoising_start` and base `denoising_end`
        (see cut_timesteps); the scheduler starts at the first of them (diffusers' set_begin_index)."""
        self._require_timesteps()
        timesteps, begin = cut_timesteps(
            self.timesteps,
            self.num_inference_steps,
            self.order,
            self.config["num_train_timesteps"],
            strength,
            denoising_start,
            denoising_end,
        )
        self._start(begin)
        return timesteps

    # --- stepping -----------------------------------------------------------------------------------------
    def _start(self, begin):
        self.step_index = self.begin_index = begin

    def _require_timesteps(self):
        if self.timesteps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) first")

    def _index(self, t, last=False):
        """The step the scheduler is at; `t` is only checked when it sits on the CPU (no sync)."""
        self._require_timesteps()
        i, n = self.step_index, len(self.timesteps)
        if i > n or (i == n and not last):
            raise ValueError(f"all {n} steps are done; call set_timesteps again to start a new run")
        if i < n and t is not None and not (torch.is_tensor(t) and t.device.type != "cpu"):
            if not bool((torch.as_tensor(t, dtype=torch.float32) == self.timesteps[i]).all()):
                raise ValueError(
                    f"got t={t!r}, but the scheduler is at step {i} (t={self.timesteps[i].item():g}): call"
                    " scale_model_input/step once per timestep, in order, as select_timesteps returned them"
                )
        return i

    def scale_model_input(self, x: torch.Tensor, t=None) -> torch.Tensor:
        self._index(t)
        return x

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t=None) -> torch.Tensor:
        """x0 noised to the level of the current step (img2img start; inpaint's per-step re-noising after
        `step`). Like diffusers once a begin index is set, the level comes from the step counter."""
        i = self._index(t, last=True)
        return self._keep[i] * x0 + self._noise[i] * noise

    def _precompute(self):
        raise NotImplementedError

    def _schedule(self, timesteps, n):
        raise NotImplementedError

    def step(self, eps, t, x, generator=None):
        raise NotImplementedError


class EulerDiscrete(Scheduler):
    """Euler's method on the probability-flow ODE in σ-space (= diffusers EulerDiscreteScheduler, s_churn=0)."""

    name = "euler"
    custom = ("timesteps", "sigmas")
    zero_snr_last = 2**-24  # fp16's smallest subnormal, diffusers' value: the first σ is then 4096, not inf
    defaults = dict(final_sigmas_type="zero")
    fixed = dict(interpolation_type="linear", timestep_type="discrete")
    sigma_schedules = tuple(SIGMA_SCHEDULES)
    ancestral = False

    def _schedule(self, timesteps, n):
        interp = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        return self._sigma_schedule(timesteps, n, (interp[-1], interp[0]))  # a σ schedule spans the spaced σ

    def _precompute(self):
        s, top = self.sigmas, self.sigmas.max()
        # "leading" starts at σ(981) but scales the noise as if at sqrt(σ²+1) (diffusers init_noise_sigma)
        spacing = self.config["timestep_spacing"]
        self.init_noise_sigma = float(top if spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5)
        self._unet_sigma_tables(s)
        self._keep, self._noise = torch.ones_like(s), s
        if self.ancestral:  # EulerAncestralDiscreteScheduler.step: go down to σ_down, add σ_up of fresh noise
            up = (s[1:] ** 2 * (s[:-1] ** 2 - s[1:] ** 2) / s[:-1] ** 2) ** 0.5
            self._dt, self._up = (s[1:] ** 2 - up**2) ** 0.5 - s[:-1], up
        else:
            self._dt = s[1:] - s[:-1]

    def _unet_sigma_tables(self, s):
        """What scale_model_input and _x0 read per UNet call: the σ the UNet sees, sqrt(σ² + 1), v's factors."""
        self._sigma, self._in_scale = s, (s**2 + 1) ** 0.5
        self._v_out, self._v_in = -s / (s**2 + 1) ** 0.5, s**2 + 1

    def scale_model_input(self, x, t=None):
        return x / self._in_scale[self._index(t)]

    def _x0(self, eps, x, i):
        """The denoised sample from the model's ε (or v) at σ_i (Euler's and Heun's pred_original_sample)."""
        return eps * self._v_out[i] + x / self._v_in[i] if self.v_prediction else x - self._sigma[i] * eps

    def step(self, eps, t, x, generator=None):
        i = self._index(t)
        self.step_index += 1
        x = x.float()  # diffusers upcasts the sample and casts the result back
        x0 = self._x0(eps, x, i)
        x_next = x + (x - x0) / self._sigma[i] * self._dt[i]
        if self.ancestral:  # noise drawn exactly where diffusers draws it, so a shared generator matches
            x_next = x_next + randn(eps.shape, generator, eps.device, eps.dtype) * self._up[i]
        return x_next.to(eps.dtype)


class EulerAncestral(EulerDiscrete):
    """Euler a (= diffusers EulerAncestralDiscreteScheduler): no Karras sigmas and always a final σ of 0,
    whatever the config says, as diffusers ignores those keys for this class; exponential and beta σ refused."""

    name = "euler_a"
    custom = ()
    ancestral = True
    sigma_schedules = ()
    forced = dict(use_karras_sigmas=False, final_sigmas_type="zero")


class HeunDiscrete(EulerDiscrete):
    """Heun's method (2nd order) on the probability-flow ODE in σ-space (= diffusers HeunDiscreteScheduler):
    every step but the last is an Euler step followed by its correction with the mean of the two slopes,
    so N steps run 2N-1 UNet calls over the timesteps t0, t1, t1, ..., t_{N-1}, t_{N-1}."""

    name = "heun"
    order = 2
    zero_snr_last = None
    custom = ("timesteps",)
    defaults = dict(clip_sample=False, clip_sample_range=1.0, beta_start=0.00085, beta_end=0.012)
    forced = dict(final_sigmas_type="zero")  # diffusers' Heun always ends at σ = 0
    fixed: dict = {}  # (Euler's interpolation_type and timestep_type are no keys of diffusers' Heun)

    def _schedule(self, timesteps, n):
        timesteps, sigmas = super()._schedule(timesteps, n)
        # = set_timesteps: every timestep after the first twice; every σ but the first and the final 0 twice
        timesteps = np.concatenate([timesteps[:1], timesteps[1:].repeat(2)])
        return timesteps, np.concatenate([sigmas[:1], sigmas[1:-1].repeat(2), sigmas[-1:]])

    def _start(self, begin):
        super()._start(begin)
        self._first = None  # (slope, dt, sample) of a step's Euler half, until its correction

    def step(self, eps, t, x, generator=None):
        i = self._index(t)
        self.step_index += 1
        sigma = self._sigma[i]  # the σ the UNet saw, in both halves
        x0 = self._x0(eps, x, i)  # no fp32 upcast here, unlike Euler (= HeunDiscreteScheduler.step)
        if self.config["clip_sample"]:
            r = self.config["clip_sample_range"]
            x0 = x0.clamp(-r, r)
        slope = (x - x0) / sigma
        if self._first is None:  # the Euler half, to the next σ; the last step is only this
            dt = self._sigma[i + 1] - sigma
            self._first = (slope, dt, x)
            return x + slope * dt
        first_slope, dt, start = self._first  # the correction: from the same start, with the mean slope
        self._first = None
        return start + (first_slope + slope) / 2 * dt


class KDPM2(HeunDiscrete):
    """DPM-Solver-2, "DPM2" (= diffusers KDPM2DiscreteScheduler): every step but the last is an Euler step to
    the geometric midpoint σ_mid = sqrt(σ_i σ_{i+1}), then the whole step with the slope found there; the UNet
    runs at t0, t_mid1, t1, t_mid2, ..., t_{N-1} (2N-1 calls); the last step is Euler's to σ = 0."""

    name = "dpm2"
    custom = ()
    defaults = dict(beta_start=0.00085, beta_end=0.012)
    forced = dict(final_sigmas_type="zero")
    karras_in_name = True

    def _sigmas(self, timesteps, n):
        """(timesteps, float32 torch σ with the final 0) as both DPM2 classes' set_timesteps start."""
        interp = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        t, sigmas = self._sigma_schedule(timesteps, n, (interp[-1], interp[0]), round_karras=True)
        return t, torch.from_numpy(sigmas.astype(np.float32))

    def _midpoint_timesteps(self, mid, t):
        """t0, then each step's midpoint timestep before its own (= set_timesteps' interleaving). The
        midpoints' go one 0-d float32 tensor at a time against float32 torch log σ, as set_timesteps calls
        _sigma_to_t: numpy then computes in float32 where a float64 array would round differently (1 ulp)."""
        log_train = torch.from_numpy(np.log(self.train_sigmas))
        t_mid = np.array([np.asarray(_sigma_to_t(m, log_train)).item() for m in mid])
        return np.concatenate([t[:1], np.stack([t_mid, t[1:]], axis=-1).reshape(-1)])

    @staticmethod
    def _per_call(x):
        """A per-step table as diffusers holds it per UNet call: the first entry once, the others twice."""
        return torch.cat([x[:1], x[1:].repeat_interleave(2), x[-1:]])

    def _schedule(self, timesteps, n):
        t, s = self._sigmas(timesteps, n)
        mid = s.log().lerp(s.roll(1).log(), 0.5).exp()  # = set_timesteps' sigmas_interpol, float32 (mid[0] = 0)
        self._mid = self._per_call(mid)
        return self._midpoint_timesteps(mid[1:-1], t), self._per_call(s).numpy()

    def _precompute(self):
        super()._precompute()
        self._mid_scale = (self._mid**2 + 1) ** 0.5

    def scale_model_input(self, x, t=None):
        i = self._index(t)
        return x / (self._in_scale[i] if self._first is None else self._mid_scale[i])

    def step(self, eps, t, x, generator=None):
        i = self._index(t)
        self.step_index += 1
        first = self._first is None
        # = KDPM2DiscreteScheduler.step: (σ, σ_mid, σ_next) of this step, read from either half's index
        sigma, mid, nxt = (
            (self._sigma[i], self._mid[i + 1], self._sigma[i + 1])
            if first
            else (self._sigma[i - 1], self._mid[i], self._sigma[i])
        )
        s_in = sigma if first else mid  # the σ the UNet saw
        x0 = eps * (-s_in / (s_in**2 + 1) ** 0.5) + x / (s_in**2 + 1) if self.v_prediction else x - s_in * eps
        if first:  # to the midpoint; the last step is only this, to σ_mid = 0
            self._first = x
            return x + (x - x0) / sigma * (mid - sigma)
        start, self._first = self._first, None
        return self._whole_step(start, (x - x0) / mid, sigma, nxt, i, eps, generator)

    def _whole_step(self, start, slope, sigma, nxt, i, eps, generator):
        """The step from its start with the midpoint's slope."""
        return start + slope * (nxt - sigma)


class KDPM2Ancestral(KDPM2):
    """DPM2 a (= diffusers KDPM2AncestralDiscreteScheduler): DPM2 aimed at Euler a's σ_down, the geometric
    midpoint taken between σ_i and σ_down, and σ_up of fresh noise added after each step's second half
    (drawn where diffusers draws it, so a shared generator matches); the last step is Euler's to σ = 0."""

    name = "dpm2_a"

    def _schedule(self, timesteps, n):
        t, s = self._sigmas(timesteps, n)  # float32 torch, as set_timesteps computes these
        nxt = torch.cat([s[1:], s.new_zeros(1)])
        up = (nxt**2 * (s**2 - nxt**2) / s**2) ** 0.5  # the last entry (0/0) is never read
        down = (nxt**2 - up**2) ** 0.5
        down[-1] = 0.0
        mid = s.log().lerp(down.log(), 0.5).exp()
        mid[-2:] = 0.0

        def shifted(x):  # diffusers reads these at a second half's index - 1: shifted so [i] serves call i
            d = self._per_call(x)
            return torch.cat([d[:1], d[:-1]])

        self._mid, self._up, self._down = shifted(mid), shifted(up), shifted(down)
        return self._midpoint_timesteps(mid[:-2], t), self._per_call(s).numpy()

    def _whole_step(self, start, slope, sigma, nxt, i, eps, generator):
        x = start + slope * (self._down[i] - sigma)
        return x + randn(eps.shape, generator, eps.device, eps.dtype) * self._up[i]


class DPMSolverSDE(HeunDiscrete):
    """DPM++ SDE, A1111's "DPM++ SDE (Karras)" (= diffusers DPMSolverSDEScheduler, k-diffusion's sample_dpmpp_sde):
    each step from σ_i to σ_{i+1} is two ancestral DPM-Solver++(1) steps in t = -log σ from the same start: one
    to the log-midpoint σ_mid = sqrt(σ_i σ_{i+1}), where the UNet runs again, then the whole step with the x0
    found there. Each goes down to σ_down by the exponential integrator, σ_down/σ_from·x - expm1(t_from -
    t_down)·x0, and adds σ_up of Brownian noise; the last step is Euler's to σ = 0. The UNet runs at t0, t_mid0,
    t1, ..., t_{N-1} (2N-1 calls); σ, init_noise_sigma and add_noise are Heun's; nothing is upcast.

    The noise is not the pipeline generator's but W(σ_to, σ_from)/sqrt(σ_from - σ_to) of a Brownian motion in
    σ (rng.BrownianInterval: one over the whole batch, or one per image for a list of seeds), made at the first
    step over the schedule's σ range with entropy noise_sampler_seed or, where the config has None, a number
    drawn there from torch's global RNG (so torch.manual_seed before a call fixes it, as in diffusers)."""

    name = "dpmpp_sde"
    custom = ()
    karras_in_name = True
    defaults = dict(beta_start=0.00085, beta_end=0.012, noise_sampler_seed=None)
    forced = dict(final_sigmas_type="zero")  # diffusers' class always ends at σ = 0
    karras_range_from_config = False  # its _convert_to_karras (LMS's) reads no sigma_min / sigma_max
    timestep_dtype = np.float64  # set_timesteps spaces "linspace" in float64 and interpolates σ there

    def __init__(self, config=None):
        super().__init__(config)
        seed = self.config["noise_sampler_seed"]
        if seed is not None and not all(
            isinstance(e, int) and not isinstance(e, bool) and e >= 0
            for e in (seed if isinstance(seed, (list, tuple)) else [seed])
        ):
            raise ValueError(
                f"scheduler config noise_sampler_seed={seed!r} must be None (a seed from torch's global RNG), an int"
                " >= 0, or a list of them, one per image"
            )

    def _schedule(self, timesteps, n):
        """= set_timesteps: Heun's doubled σ and timesteps, the second of each pair replaced by the timestep
        of the step's log-midpoint σ (= _second_order_timesteps, float64 numpy as there)."""
        timesteps, sigmas = super()._schedule(timesteps, n)
        t = -np.log(sigmas[:-1:2])  # t = -log σ at σ_0 .. σ_{N-1}
        timesteps[1::2] = _sigma_to_t(np.exp(-(t[:-1] + np.diff(t) * 0.5)), np.log(self.train_sigmas))
        return timesteps, sigmas

    def _precompute(self):
        """Per UNet call i (the first or second half of step i // 2, from σ to σ_next), the float32 scalars
        DPMSolverSDEScheduler.step computes from 0-d tensors, in its order: the σ the UNet sees (σ, then σ_mid
        = sigma_fn(t_proposed)), the ancestral step from σ_from = sigma_fn(t) to σ_to = sigma_fn(t_proposed)
        (first half) or sigma_fn(t_next) (second half): σ_up, σ_down, the update's factors, and the noise's
        query times and scale. Euler's tables stay on the doubled σ (add_noise, the last step's dt)."""
        super()._precompute()
        s, n = self.sigmas, len(self.timesteps)
        t, t_next = s[0::2].log().neg(), s[1::2].log().neg()  # per step; t_next = inf at the final σ of 0
        t_mid = t + (t_next - t) * 0.5

        def per_call(first_half, second_half):
            return torch.stack([first_half, second_half], dim=1).reshape(-1)[:n]

        self._unet_sigma_tables(per_call(s[0::2], t_mid.neg().exp()))
        self._euler = per_call(s[1::2] == 0, s[1::2] == 0).tolist()  # the last step, to σ = 0: Euler's
        t_from = per_call(t, t)
        sigma_from, sigma_to = t_from.neg().exp(), per_call(t_mid, t_next).neg().exp()
        up = torch.minimum(sigma_to, (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
        t_down = ((sigma_to**2 - up**2) ** 0.5).log().neg()
        self._ratio, self._c, self._up = t_down.neg().exp() / sigma_from, (t_from - t_down).expm1(), up
        self._query = list(zip(sigma_to.tolist(), sigma_from.tolist()))  # W(ta, tb) with ta < tb: σ_to first
        self._span = (sigma_to - sigma_from).abs().sqrt()

    def _start(self, begin):
        super()._start(begin)
        self._brownian = None  # made at the first step (set_timesteps drops diffusers' noise_sampler)

    def _brownian_noise(self, x):
        """= step's BrownianTreeNoiseSampler: over the schedule's σ > 0 (all of it, also in a cut run), in the
        first step's sample's shape, dtype and device; a list of seeds gives each image its own motion."""
        seed = self.config["noise_sampler_seed"]
        if seed is None:  # = BatchedBrownianTree: drawn from the global RNG at the first step
            seed = torch.randint(0, 2**63 - 1, []).item()
        s = self.sigmas
        span = (float(s[s > 0].min()), float(s.max()))
        if not isinstance(seed, (list, tuple)):
            return BrownianInterval(*span, x.shape, x.dtype, x.device, seed)
        if len(seed) != len(x):
            raise ValueError(f"scheduler config noise_sampler_seed has {len(seed)} seeds for a batch of {len(x)}")
        motions = [BrownianInterval(*span, x.shape[1:], x.dtype, x.device, e) for e in seed]
        return lambda ta, tb: torch.stack([w(ta, tb) for w in motions])

    def step(self, eps, t, x, generator=None):  # = DPMSolverSDEScheduler.step; the generator is not used
        i = self._index(t)
        self.step_index += 1
        if self._brownian is None:
            self._brownian = self._brownian_noise(x)
        x0 = self._x0(eps, x, i)
        if self._euler[i]:
            return x + (x - x0) / self._sigma[i] * self._dt[i]
        if self._first is None:  # the first half, to σ_mid; its start is the second half's too
            start = self._first = x
        else:
            start, self._first = self._first, None
        x_next = self._ratio[i] * start - self._c[i] * x0
        # BatchedBrownianTree sorts the query times up and so negates W (σ_to < σ_from)
        return x_next + -self._brownian(*self._query[i]) / self._span[i] * self._up[i]


class LMSDiscrete(EulerDiscrete):
    """Linear multistep, "LMS" (= diffusers LMSDiscreteScheduler, k-diffusion's sample_lms): the step from
    σ_i to σ_{i+1} integrates the polynomial in σ through the slopes (x - x0)/σ of the last `order` (4) steps.
    Sigmas, timesteps, init_noise_sigma, scale_model_input, x0 and add_noise are Euler's; no fp32 upcast."""

    name = "lms"
    zero_snr_last = None
    custom = ()
    defaults: dict = {}
    forced = dict(final_sigmas_type="zero")  # diffusers' LMS always ends at σ = 0
    fixed: dict = {}  # (Euler's interpolation_type and timestep_type are no keys of diffusers' LMS)
    karras_range_from_config = False  # its _convert_to_karras reads no sigma_min / sigma_max (its others do)
    karras_in_name = True

    def _precompute(self):
        super()._precompute()
        self._sigma_list = self.sigmas.tolist()  # float32 values as Python floats, for the coefficients

    def _start(self, begin):
        super()._start(begin)
        self._derivatives = []  # the slopes of the steps run so far, newest last (diffusers' `derivatives`)

    def _coefficients(self, i, order):
        """The weight of each of the last `order` slopes, newest first: the integral from σ_i to σ_{i+1} of
        the Lagrange basis polynomial that is 1 at that slope's σ and 0 at the others' (= get_lms_coefficient
        for current_order 0..order-1). diffusers integrates numerically (scipy's quad, the integrand in float32
        since its σ are float32 tensors: 1e-7 to 1e-6 off); here exactly, in u = τ - σ_i, where the expanded
        polynomial's terms all have one sign on [0, σ_{i+1} - σ_i], so none cancel."""
        s = self._sigma_list
        d, h = [s[i - k] - s[i] for k in range(order)], s[i + 1] - s[i]
        out = []
        for j in range(order):
            poly, den = [1.0], 1.0  # Π_{k≠j} (u - d_k), lowest power first, and Π_{k≠j} (d_j - d_k)
            for k in range(order):
                if k != j:
                    poly = [a - d[k] * b for a, b in zip([0.0, *poly], [*poly, 0.0])]
                    den *= d[j] - d[k]
            if den == 0:  # diffusers divides by 0 here and returns NaN latents
                raise ValueError(
                    f"the {self.name} scheduler's sigmas {s[i - order + 1 : i + 1]} repeat a value (as 1000 'leading'"
                    " steps do), so no polynomial passes through its slopes; use fewer steps or another spacing"
                )
            out.append(sum(c * h ** (m + 1) / (m + 1) for m, c in enumerate(poly)) / den)
        return out

    def step(self, eps, t, x, generator=None, order=4):  # = LMSDiscreteScheduler.step's default order
        i = self._index(t)
        # the order follows the step index, not the slopes kept: a run started mid-schedule (img2img) weights
        # its first slope by the order-4 polynomial's coefficient, as diffusers does (zip stops at the slopes)
        coeffs = self._coefficients(i, min(i + 1, order))  # Python floats, as diffusers' (matters in fp16)
        self.step_index += 1
        self._derivatives.append((x - self._x0(eps, x, i)) / self._sigma[i])
        if len(self._derivatives) > order:  # one out per step, as diffusers pops
            self._derivatives.pop(0)
        return x + sum(c * d for c, d in zip(coeffs, reversed(self._derivatives)))


class DDIM(Scheduler):
    """Deterministic DDIM, eta=0 (= diffusers DDIMScheduler as SDXL pipelines call it)."""

    name = "ddim"
    zero_snr_last = 0.0  # the rescale's own value: diffusers' DDIM, LCM and TCD keep it (x0 from ε is then inf at T)
    defaults = dict(timestep_spacing="leading", clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True)
    fixed = dict(thresholding=False)
    integer_timesteps = True

    def _alphas(self, timesteps):
        """ᾱ at each timestep, and the ᾱ the last step ends at (set_alpha_to_one: 1, else ᾱ of t=0)."""
        ac = self.alphas_cumprod
        return ac[timesteps.long()], torch.tensor(1.0) if self.config["set_alpha_to_one"] else ac[0]

    def _schedule(self, timesteps, n):
        # `sigmas` for DDIM: the σ each step starts from, then the σ the last step ends at
        a, final = self._alphas(torch.from_numpy(timesteps))
        a = torch.cat([a, final[None]])
        return timesteps, (((1 - a) / a) ** 0.5).numpy()

    def _precompute(self):
        a, final = self._alphas(self.timesteps)
        # diffusers steps to t - T//N, which is the next timestep only for "leading" (diffusers#9261)
        prev = self.timesteps.long() - self.config["num_train_timesteps"] // self.num_inference_steps
        a_prev = torch.where(prev >= 0, self.alphas_cumprod[prev.clamp(min=0)], final)
        self._sqrt_a, self._sqrt_b = a**0.5, (1 - a) ** 0.5
        self._sqrt_a_prev, self._dir = a_prev**0.5, (1 - a_prev) ** 0.5
        a = torch.cat([a, final[None]])
        self._keep, self._noise = a**0.5, (1 - a) ** 0.5

    def step(self, eps, t, x, generator=None):
        i = self._index(t)
        self.step_index += 1
        sa, sb = self._sqrt_a[i], self._sqrt_b[i]
        if self.v_prediction:
            x0, eps = sa * x - sb * eps, sa * eps + sb * x
        else:
            x0 = (x - sb * eps) / sa
        if self.config["clip_sample"]:
            r = self.config["clip_sample_range"]
            x0 = x0.clamp(-r, r)
        return self._sqrt_a_prev[i] * x0 + self._dir[i] * eps


class LCM(DDIM):
    """Latent Consistency Model sampling (= diffusers LCMScheduler), for LCM-LoRA and LCM-distilled UNets:
    each step maps x_t to the consistency function's output, c_skip * x_t + c_out * x0 (x0 as in DDIM),
    and, but on the last step of the schedule, noises it afresh to the next timestep. The timesteps are
    `num_inference_steps` evenly spaced indices into the distillation schedule of original_inference_steps
    (50: 999, 979, ..., 19); timestep_spacing does not apply."""

    name = "lcm"
    custom = ("timesteps",)
    defaults = dict(
        original_inference_steps=50,
        clip_sample=False,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        timestep_scaling=10.0,
        timestep_spacing="leading",
    )

    def _spaced_timesteps(self, n):
        T, steps = self.config["num_train_timesteps"], self.config["original_inference_steps"]
        if n > steps:
            raise ValueError(
                f"the lcm scheduler runs at most original_inference_steps={steps} steps (a subset of the schedule "
                f"it was distilled on), got num_inference_steps={n}; LCM needs only 2-8"
            )
        origin = (np.arange(1, steps + 1) * (T // steps) - 1)[::-1]
        return origin[np.floor(np.linspace(0, steps, num=n, endpoint=False)).astype(np.int64)].astype(np.float32)

    def _schedule(self, timesteps, n):
        if np.any(np.diff(timesteps) >= 0):
            raise ValueError(f"{self.name} timesteps must be in descending order, got {timesteps.tolist()}")
        return super()._schedule(timesteps, n)

    def _precompute(self):
        super()._precompute()
        t = self.timesteps.long()
        a = self.alphas_cumprod[t]
        # = LCMScheduler.step: the next timestep's ᾱ (the last step's own: it adds no noise), all float32
        self._a, self._a_next = a, torch.cat([a[1:], a[-1:]])
        scaled = t * self.config["timestep_scaling"]  # = get_scalings_for_boundary_condition_discrete
        self._c_skip = 0.25 / (scaled**2 + 0.25)  # sigma_data = 0.5
        self._c_out = scaled / (scaled**2 + 0.25) ** 0.5

    def step(self, eps, t, x, generator=None):
        i = self._index(t)
        self.step_index += 1
        a, a_next = self._a[i], self._a_next[i]
        b, b_next = 1 - a, 1 - a_next
        x0 = a.sqrt() * x - b.sqrt() * eps if self.v_prediction else (x - b.sqrt() * eps) / a.sqrt()
        if self.config["clip_sample"]:
            r = self.config["clip_sample_range"]
            x0 = x0.clamp(-r, r)
        denoised = self._c_out[i] * x0 + self._c_skip[i] * x
        if i == self.num_inference_steps - 1:  # = diffusers: by the step counter, not the end of a cut run
            return denoised
        return a_next.sqrt() * denoised + b_next.sqrt() * randn(eps.shape, generator, eps.device, denoised.dtype)


class TCD(LCM):
    """Trajectory Consistency Distillation sampling (= diffusers TCDScheduler), for TCD-LoRA / Hyper-SD: from
    x_t, the model's x0 and ε give the sample at the earlier timestep s = floor((1 - eta) * t_next); for
    eta > 0 (TCD's gamma; a pipeline call's eta=, 0 by default) that is noised forward to t_next, but on the
    schedule's last step. Timesteps as LCM's."""

    name = "tcd"
    takes_eta = True

    def step(self, eps, t, x, generator=None, eta=0.3):  # = TCDScheduler.step's default eta
        if not 0 <= eta <= 1:
            raise ValueError(f"eta (TCD's gamma) must be in [0, 1], got {eta!r}")
        i = self._index(t)
        self.step_index += 1
        ac, ts = self.alphas_cumprod, self.timesteps.long()
        t_next = ts[i + 1] if i + 1 < len(ts) else torch.tensor(0)
        a, a_next, a_s = ac[ts[i]], ac[t_next], ac[torch.floor((1 - eta) * t_next).long()]
        b, b_s = 1 - a, 1 - a_s
        if self.v_prediction:  # ** 0.5 here, .sqrt() below, as TCDScheduler.step writes them
            x0, eps = a**0.5 * x - b**0.5 * eps, a**0.5 * eps + b**0.5 * x
        else:
            x0 = (x - b.sqrt() * eps) / a.sqrt()
        noised = a_s.sqrt() * x0 + b_s.sqrt() * eps
        if eta == 0 or i == self.num_inference_steps - 1:
            return noised
        noise = randn(eps.shape, generator, eps.device, noised.dtype)
        return (a_next / a_s).sqrt() * noised + (1 - a_next / a_s).sqrt() * noise


class DPMSolverMultistep(Scheduler):
    """DPM-Solver++ (= diffusers DPMSolverMultistepScheduler): multistep updates on x0-predictions of
    order solver_order: 2 (DPM++ 2M), 3 (DPM++ 3M) or 1 (DPM-Solver-1, DDIM's update), lowered at the first
    steps after a (re)start, where the earlier steps' x0s are missing, and at the end as `lower_order_final`
    / `final_sigmas_type` / `euler_at_final` say; solver_type "midpoint" or "heun" picks the 2nd-order
    update. algorithm_type "sde-dpmsolver++" (DPM++ 2M / 3M SDE): the same updates on the SDE, each step
    shrinking the sample by another e^-h and adding fresh noise of σ_t·sqrt(1 - e^-2h), drawn from the
    generator where diffusers' step draws it. A1111's and ComfyUI's "DPM++ 3M SDE" (k-diffusion's
    sample_dpmpp_3m_sde) draw Brownian-tree noise, which no diffusers scheduler reproduces: DPM++ 3M SDE
    here is diffusers' solver_order=3 with "sde-dpmsolver++", the same images as diffusers gives."""

    name = "dpmpp_2m"
    zero_snr_last = 2**-24  # as Euler (and UniPC, which inherits it)
    custom = ("timesteps",)
    defaults = dict(
        final_sigmas_type="zero",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        euler_at_final=False,
        algorithm_type="dpmsolver++",
    )
    fixed = dict(
        thresholding=False,
        variance_type=None,
        lambda_min_clipped=-math.inf,
        use_lu_lambdas=False,
        use_flow_sigmas=False,
        use_dynamic_shifting=False,
    )
    sigma_schedules = tuple(SIGMA_SCHEDULES)
    karras_in_name = True  # (its name is composed in __init__)
    extra_point = 1
    integer_timesteps = True
    upcast = True  # step computes the update in fp32 (EDM's does not)

    def __init__(self, config=None):
        super().__init__(config)
        cfg = self.config
        self.sde = _choice(cfg, "algorithm_type", ("dpmsolver++", "sde-dpmsolver++")) == "sde-dpmsolver++"
        self.solver_order = int(_choice(cfg, "solver_order", (1, 2, 3)))
        if cfg["solver_type"] in ("logrho", "bh1", "bh2"):  # DEIS's and UniPC's: diffusers' __init__ sets midpoint
            cfg["solver_type"] = "midpoint"
        _choice(cfg, "solver_type", ("midpoint", "heun"))
        # solver_order 1 has no SCHEDULERS entry: its name "dpmpp_1m" only describes it
        self.name = f"dpmpp_{self.solver_order}m" + "_sde" * self.sde + self._schedule_suffix()

    def _schedule(self, timesteps, n):
        train = self.train_sigmas  # a σ schedule spans the whole training range here, unlike Euler
        return self._sigma_schedule(timesteps, n, (train[0], train[-1]), round_karras=True)

    def _alpha_sigma_tables(self):
        """alpha, sigma (= _sigma_to_alpha_sigma_t: the sample is alpha·x0 + sigma·noise) and lambda =
        log(alpha / sigma) at every schedule point; add_noise's levels are alpha and sigma."""
        s = self.sigmas
        self._alpha = alpha = 1 / (s**2 + 1) ** 0.5
        self._sigma = sigma = s * alpha
        self._lambda = torch.log(alpha) - torch.log(sigma)  # +inf at a final σ of 0
        self._keep, self._noise = alpha, sigma

    def _x0(self, eps, x, i):  # = convert_model_output (dpmsolver++ / UniPC's predict_x0)
        return (
            self._alpha[i] * x - self._sigma[i] * eps
            if self.v_prediction
            else (x - self._sigma[i] * eps) / self._alpha[i]
        )

    def _precompute(self):
        """Per step i (from point i to i+1): x_next = ratio·x - c0·D0 - c1·D1 - c2·D2 (+ noise), D0 the x0,
        D1 and D2 its differences to the last steps' x0s (see step). The c are negated where diffusers adds
        the term, which rounds the same (= dpm_solver_first_order_update, multistep_dpm_solver_second_order_
        update, multistep_dpm_solver_third_order_update, "dpmsolver++" and "sde-dpmsolver++" branches)."""
        cfg, n = self.config, len(self.timesteps)
        self._alpha_sigma_tables()
        alpha, sigma, lam = self._alpha[1:], self._sigma, self._lambda
        h = lam[1:] - lam[:-1]  # +inf into a final σ of 0: that step is then 1st order
        self._ratio = sigma[1:] / sigma[:-1]
        if self.sde:
            e = torch.exp(-2.0 * h)
            self._ratio = self._ratio * torch.exp(-h)
            c0 = -(alpha * (1 - e))
            c1 = -(alpha * ((1.0 - e) / (-2.0 * h) + 1.0))
            # diffusers' "- 0.5", kept for parity: the ODE's term (2h for h) and k-diffusion's sample_dpmpp_3m_sde
            # have "+ 0.5" (50 steps on Gaussian data give 21% too much variance, 0.8% with +0.5: tests' VAR_TOL)
            c2 = -(alpha * ((1.0 - e - 2.0 * h) / (2.0 * h) ** 2 - 0.5))
            self._noise_scale = sigma[1:] * torch.sqrt(1.0 - e)
        else:
            e = torch.exp(-h)
            c0 = alpha * (e - 1.0)
            c1 = -(alpha * ((e - 1.0) / h + 1.0))
            c2 = alpha * ((e - 1.0 + h) / h**2 - 0.5)
        self._c0, self._c1, self._c2 = c0, c1, c2
        # the 2nd-order update's D1 term: midpoint's is half of c0, heun's the 3rd order's c1
        self._c1_second = 0.5 * c0 if cfg["solver_type"] == "midpoint" else c1
        # step-size ratios r0 = h_0/h, r1 = h_1/h to the one and two steps before (none at steps 0, 1)
        nan = torch.tensor([math.nan, math.nan])
        r0, r1 = torch.cat([nan[:1], h[:-1] / h[1:]]), torch.cat([nan, h[:-2] / h[2:]])
        self._inv_r0, self._inv_r1 = 1.0 / r0, 1.0 / r1
        self._r0_share, self._inv_r01 = r0 / (r0 + r1), 1.0 / (r0 + r1)
        self._set_max_order(n)

    def _set_max_order(self, n):
        """The highest order each step may take (= step's lower_order_final and lower_order_second); the
        first steps after a (re)start take less, as lower_order_nums counts."""
        cfg = self.config
        short = cfg["lower_order_final"] and n < 15
        self._max_order = [self.solver_order] * n
        if short and n >= 2:
            self._max_order[-2] = min(self.solver_order, 2)
        if cfg["euler_at_final"] or short or cfg["final_sigmas_type"] == "zero":
            self._max_order[-1] = 1

    def _start(self, begin):
        super()._start(begin)
        self._x0s, self._lower_order_nums = [], 0  # the last steps' x0s (newest last), how many count

    def step(self, eps, t, x, generator=None):  # = DPMSolverMultistepScheduler.step
        i = self._index(t)
        self.step_index += 1
        x0 = self._x0(eps, x, i)
        if self.upcast:  # diffusers upcasts only after converting ε to x0: x0 and its differences keep its dtype
            x = x.float()
        order = min(self._max_order[i], self._lower_order_nums + 1)
        x_next = self._ratio[i] * x - self._c0[i] * x0
        if order == 2:
            x_next = x_next - self._c1_second[i] * (self._inv_r0[i] * (x0 - self._x0s[-1]))
        elif order == 3:
            m1, m2 = self._x0s[-1], self._x0s[-2]
            d1_0, d1_1 = self._inv_r0[i] * (x0 - m1), self._inv_r1[i] * (m1 - m2)
            d1 = d1_0 + self._r0_share[i] * (d1_0 - d1_1)
            d2 = self._inv_r01[i] * (d1_0 - d1_1)
            x_next = x_next - self._c1[i] * d1 - self._c2[i] * d2
        if self.sde:  # one draw per step (also the last, whose σ_t of 0 makes it count for nothing), in the update's
            # dtype: fp32 after the upcast, else x0's (= EDMDPMSolverMultistepScheduler.step's model_output.dtype)
            x_next = x_next + self._noise_scale[i] * randn(eps.shape, generator, eps.device, x_next.dtype)
        self._x0s = [*self._x0s[-1:], x0]
        self._lower_order_nums = min(self._lower_order_nums + 1, self.solver_order)
        return x_next.to(x0.dtype)


class DPMSolverSinglestep(DPMSolverMultistep):
    """DPM-Solver++ singlestep, "DPM++ 2S" / "3S" (= diffusers DPMSolverSinglestepScheduler): the steps go in
    groups of solver_order; the k-th step of a group jumps from the group's first sample straight to the next
    point with the k model outputs of the group so far (so inside a group the samples in between are only
    where the model is evaluated). Orders per step as get_order_list after set_timesteps' overrides
    (lower_order_final on when the steps do not divide into groups or the run ends at σ 0). Timesteps always
    spaced "linspace" (diffusers' class has no timestep_spacing); nothing upcast, as there."""

    name = "dpmpp_2s"
    defaults = dict(
        final_sigmas_type="zero",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=False,
        algorithm_type="dpmsolver++",
    )
    forced = dict(timestep_spacing="linspace", steps_offset=0)  # set_timesteps: linspace(0, T - 1, N + 1)
    upcast = False
    zero_snr_last = None  # diffusers' singlestep class has no rescale_betas_zero_snr

    def __init__(self, config=None):
        super().__init__(config)
        self.name = f"dpmpp_{self.solver_order}s" + "_sde" * self.sde + self._schedule_suffix()

    def _precompute(self):
        self._alpha_sigma_tables()
        n, k, cfg = len(self.timesteps), self.solver_order, self.config
        if n % k or cfg["final_sigmas_type"] == "zero":
            # = set_timesteps' register_to_config(lower_order_final=True): it sticks for later runs, as there
            cfg["lower_order_final"] = True
        group = list(range(1, k + 1))
        if not cfg["lower_order_final"]:
            orders = group * (n // k)
        elif n % k:  # the last, short group: 1, 2, ... n % k
            orders = group * (n // k) + group[: n % k]
        else:  # the last group split: 3S ... 1, 2, 1; 2S ... 1, 1
            orders = group * (n // k - 1) + group[:-1] + [1]
        if cfg["final_sigmas_type"] == "zero":
            orders[-1] = 1
        self._orders = orders

    def _start(self, begin):
        Scheduler._start(self, begin)
        self._outs, self._sample = [None] * self.solver_order, None  # the group's x0s (newest last), 1st sample

    def step(self, eps, t, x, generator=None):  # = DPMSolverSinglestepScheduler.step
        i = self._index(t)
        self.step_index += 1
        x0 = self._x0(eps, x, i)
        self._outs = [*self._outs[1:], x0]
        order = self._orders[i]
        while self._outs[-order] is None:  # a run started mid-group (img2img): what the group has
            order -= 1
        if order == 1:
            self._sample = x
        noise = randn(eps.shape, generator, eps.device, x0.dtype) if self.sde else None
        return self._update(i, order, self._sample, noise)

    def _update(self, i, order, x, noise):
        """= dpm_solver_first_order_update and singlestep_dpm_solver_second / third_order_update from the
        group's first point j to i + 1, term for term in diffusers' order ("dpmsolver++" and "sde-dpmsolver++")."""
        a, s, lam = self._alpha, self._sigma, self._lambda
        j, heun = i + 1 - order, self.config["solver_type"] == "heun"
        alpha_t, sigma_t = a[i + 1], s[i + 1]
        h = lam[i + 1] - lam[j]
        if self.sde:
            e = torch.exp(-2.0 * h)
            start, c0 = (sigma_t / s[j] * torch.exp(-h)) * x, alpha_t * (1 - e)
            c1 = alpha_t * ((1.0 - e) / (-2.0 * h) + 1.0)
            c2 = alpha_t * ((1.0 - e + (-2.0 * h)) / (-2.0 * h) ** 2 - 0.5)
            half = 0.5 * c0
        else:  # the ODE's terms, negated where diffusers subtracts them
            e = torch.exp(-h)
            start, c0 = (sigma_t / s[j]) * x, -(alpha_t * (e - 1.0))
            c1 = alpha_t * ((e - 1.0) / h + 1.0)
            c2 = -(alpha_t * ((e - 1.0 + h) / h**2 - 0.5))
            half = 0.5 * c0
        m = self._outs[-order:]  # m[0] at point j, ..., m[-1] at point i
        if order == 1:
            x_t = start + c0 * m[0]
        elif order == 2:
            r0 = (lam[i] - lam[j]) / h
            d1 = (1.0 / r0) * (m[1] - m[0])
            x_t = start + c0 * m[0] + (c1 if heun else half) * d1
        else:
            r0, r1 = (lam[i] - lam[j]) / h, (lam[i - 1] - lam[j]) / h
            d1_0, d1_1 = (1.0 / r1) * (m[1] - m[0]), (1.0 / r0) * (m[2] - m[0])
            if heun:
                d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
                d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
                x_t = start + c0 * m[0] + c1 * d1 + c2 * d2
            else:
                x_t = start + c0 * m[0] + c1 * d1_1
        if noise is not None:
            x_t = x_t + sigma_t * torch.sqrt(1.0 - e) * noise
        return x_t


class UniPCMultistep(DPMSolverMultistep):
    """UniPC, 2nd order, B(h) = bh2 (or bh1), x0-prediction (= diffusers UniPCMultistepScheduler): at
    each step a corrector first refines the sample the last step predicted, using the new model output
    (UniC), then a predictor steps on (UniP). Timesteps, sigmas, the alpha/sigma/lambda tables, x0 and
    add_noise are DPM-Solver's. The update formulas are computed per step, in diffusers' order and
    dtypes (fp16 stays fp16)."""

    name = "unipc"
    karras_in_name = True
    final_sigma_is_last = True
    custom = ()
    defaults = dict(
        final_sigmas_type="zero",
        lower_order_final=True,
        solver_type="bh2",
        disable_corrector=[],
        timestep_spacing="linspace",
    )
    fixed = dict(
        solver_order=2,
        predict_x0=True,
        thresholding=False,
        solver_p=None,
        use_flow_sigmas=False,
        use_dynamic_shifting=False,
    )

    def __init__(self, config=None):
        Scheduler.__init__(self, config)  # not DPM-Solver's: no algorithm_type here
        self.bh1 = _choice(self.config, "solver_type", ("bh1", "bh2")) == "bh1"

    def _precompute(self):  # the tables only: the update coefficients are computed per step
        self._alpha_sigma_tables()

    def _start(self, begin):
        super()._start(begin)
        self._outs, self._last, self._order = [None, None], None, 0  # x0 history, UniP's input, its order

    def _bh(self, t, s0, order):
        """What UniP and UniC share, from schedule point s0 to t: alpha_t, sigma_t / sigma_s0, h·phi_1(h),
        B(h), the order conditions R, b, and (order 2) D1, the x0 difference to the point before s0 over
        its lambda ratio rk, as [B, 1, ...] (else None)."""
        alpha_t, sigma_t, sigma_s0 = self._alpha[t], self._sigma[t], self._sigma[s0]
        lam_s0 = self._lambda[s0]
        h = self._lambda[t] - lam_s0
        hh = -h
        h_phi_1 = torch.expm1(hh)
        b_h = hh if self.bh1 else torch.expm1(hh)
        rks, d1 = [torch.ones(())], None
        if order == 2:
            rk = (self._lambda[s0 - 1] - lam_s0) / h
            rks.insert(0, rk)
            d1 = torch.stack([(self._outs[-2] - self._outs[-1]) / rk], dim=1)
        rks = torch.stack(rks)
        h_phi_k, factorial, R, b = h_phi_1 / hh - 1, 1, [], []
        for k in range(1, order + 1):
            R.append(torch.pow(rks, k - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        return alpha_t, sigma_t / sigma_s0, h_phi_1, b_h, torch.stack(R), torch.stack(b), d1

    def _predict(self, x, i, order):  # = multistep_uni_p_bh_update
        alpha_t, ratio, h_phi_1, b_h, _, _, d1 = self._bh(i + 1, i, order)
        x_t = ratio * x - alpha_t * h_phi_1 * self._outs[-1]
        if d1 is not None:
            x_t = x_t - alpha_t * b_h * torch.einsum("k,bkc...->bc...", torch.ones(1, dtype=x.dtype) * 0.5, d1)
        return x_t.to(x.dtype)

    def _correct(self, x0_t, last, i, order):  # = multistep_uni_c_bh_update: `last` redone with x0_t
        alpha_t, ratio, h_phi_1, b_h, R, b, d1 = self._bh(i, i - 1, order)
        rhos = torch.ones(1, dtype=last.dtype) * 0.5 if order == 1 else torch.linalg.solve(R, b).to(last.dtype)
        res = torch.einsum("k,bkc...->bc...", rhos[:-1], d1) if d1 is not None else 0
        x_t = ratio * last - alpha_t * h_phi_1 * self._outs[-1]
        return (x_t - alpha_t * b_h * (res + rhos[-1] * (x0_t - self._outs[-1]))).to(last.dtype)

    def step(self, eps, t, x, generator=None):  # = UniPCMultistepScheduler.step
        i = self._index(t)
        x0 = self._x0(eps, x, i)
        if i > 0 and i - 1 not in self.config["disable_corrector"] and self._last is not None:
            x = self._correct(x0, self._last, i, self._order)
        self._outs = [self._outs[-1], x0]
        this_order = min(2, len(self.timesteps) - i) if self.config["lower_order_final"] else 2
        self._order = min(this_order, self._lower_order_nums + 1)  # 1st order until there is history
        self._last = x
        x_next = self._predict(x, i, self._order)
        self._lower_order_nums = min(self._lower_order_nums + 1, 2)
        self.step_index += 1
        return x_next


class DEISMultistep(DPMSolverMultistep):
    """DEIS, log-rho multistep of order solver_order 1, 2 (default) or 3 (= diffusers DEISMultistepScheduler,
    algorithm_type "deis", solver_type "logrho"). Timesteps, the alpha/sigma/lambda tables, x0, add_noise and
    the order rules (lowered after a (re)start and, under 15 steps, at the end) are DPM-Solver's. What
    differs: the run ends at σ_train[0] (after a Karras / exponential / beta schedule at its last σ), never at
    0, so the last step is 1st order only under lower_order_final; the history holds ε re-derived from x0, not
    x0; and the 2nd/3rd-order steps integrate the Lagrange polynomial through the past ε in log ρ (ρ = σ/α) exactly.
    Like diffusers' step, nothing is upcast: fp16 latents step in fp16."""

    name = "deis"
    zero_snr_last = None
    karras_in_name = True
    final_sigma_is_last = True  # after a σ schedule its last σ, repeated; else σ_train[0]
    custom = ()
    defaults = dict(
        solver_order=2,
        algorithm_type="deis",
        solver_type="logrho",
        lower_order_final=True,
        timestep_spacing="linspace",
    )
    # DEIS has neither key: it always ends at σ_train[0] and lowers the last step only for short runs
    forced = dict(final_sigmas_type="sigma_min", euler_at_final=False)
    fixed = dict(thresholding=False, use_flow_sigmas=False, use_dynamic_shifting=False)

    def __init__(self, config=None):
        Scheduler.__init__(self, config)  # not DPM-Solver's: its algorithm and solver types differ
        cfg = self.config
        # = DEISMultistepScheduler.__init__: DPM-Solver's and UniPC's types are taken as DEIS's own
        if cfg["algorithm_type"] in ("dpmsolver", "dpmsolver++"):
            cfg["algorithm_type"] = "deis"
        if cfg["solver_type"] in ("midpoint", "heun", "bh1", "bh2"):
            cfg["solver_type"] = "logrho"
        _choice(cfg, "algorithm_type", ("deis",))
        _choice(cfg, "solver_type", ("logrho",))
        self.sde = False
        self.solver_order = int(_choice(cfg, "solver_order", (1, 2, 3)))

    def _precompute(self):
        """Per step i (from point i to i+1), as diffusers computes them from float32 0-d tensors:
        1st order (= deis_first_order_update): x_next = ratio·x - c·ε;
        2nd/3rd order (= multistep_deis_second/third_order_update): x_next = α_t·(x/α_s0 + Σ_k coef_k·ε_k),
        ε_k the ε of this step and the one or two before, coef_k the integral over log ρ from ρ_s0 to ρ_t of
        the Lagrange basis polynomial of point k (ind_fn; numpy's log, which diffusers calls on the tensors)."""
        n = len(self.timesteps)
        self._alpha_sigma_tables()
        alpha, sigma, lam = self._alpha, self._sigma, self._lambda
        h = lam[1:] - lam[:-1]
        self._ratio = alpha[1:] / alpha[:-1]
        self._c = sigma[1:] * (torch.exp(h) - 1.0)

        rho = sigma / alpha

        def log(v):  # numpy's float32 log, as diffusers' np.log on 0-d tensors (torch's may differ by an ulp)
            return torch.from_numpy(np.log(v.numpy()))

        nan = torch.tensor([math.nan, math.nan])
        # ρ at the target t, at this step's s0 and the steps before, s1 and s2 (NaN where there is none)
        t, s0 = rho[1:], rho[:-1]
        s1, s2 = torch.cat([nan[:1], rho])[:n], torch.cat([nan, rho])[:n]
        lt, l0, l1, l2 = log(t), log(s0), log(s1), log(s2)

        def ind2(x, lx, lb, lc):  # Integrate[(log(x) - log(c)) / (log(b) - log(c)), {x}]
            return x * (-lc + lx - 1) / (lb - lc)

        def ind3(x, lx, lb, lc, ld):  # Integrate[(log x - log c)(log x - log d) / (log b - log c)(log b - log d), {x}]
            num = x * (lc * (ld - lx + 1) - ld * lx + ld + lx**2 - 2 * lx + 2)
            return num / ((lb - lc) * (lb - ld))

        self._coef2 = (
            ind2(t, lt, l0, l1) - ind2(s0, l0, l0, l1),
            ind2(t, lt, l1, l0) - ind2(s0, l0, l1, l0),
        )
        self._coef3 = (
            ind3(t, lt, l0, l1, l2) - ind3(s0, l0, l0, l1, l2),
            ind3(t, lt, l1, l2, l0) - ind3(s0, l0, l1, l2, l0),
            ind3(t, lt, l2, l0, l1) - ind3(s0, l0, l2, l0, l1),
        )
        self._set_max_order(n)

    def step(self, eps, t, x, generator=None):  # = DEISMultistepScheduler.step
        i = self._index(t)
        self.step_index += 1
        # = convert_model_output "deis": ε re-derived from x0 (v_prediction's x0 gives a different ε)
        eps = (x - self._alpha[i] * self._x0(eps, x, i)) / self._sigma[i]
        order = min(self._max_order[i], self._lower_order_nums + 1)
        if order == 1:
            x_next = self._ratio[i] * x - self._c[i] * eps
        else:
            coef = self._coef2 if order == 2 else self._coef3
            x_next = x / self._alpha[i] + coef[0][i] * eps + coef[1][i] * self._x0s[-1]
            if order == 3:
                x_next = x_next + coef[2][i] * self._x0s[-2]
            x_next = self._alpha[i + 1] * x_next
        self._x0s = [*self._x0s[-1:], eps]  # DEIS's history is of ε, in the parent's list
        self._lower_order_nums = min(self._lower_order_nums + 1, self.solver_order)
        return x_next


class _EDM:
    """What diffusers' two EDM schedulers (EDMEulerScheduler, EDMDPMSolverMultistepScheduler) share, mixed in
    before the class whose update rule each reuses: no betas, but n σ from sigma_max down to sigma_min (Karras's
    ρ ramp or exponential) and a final one; timesteps 0.25·log σ (precondition_noise); the UNet input scaled by
    c_in = 1/sqrt(σ² + σ_data²) and x0 = c_skip·x + c_out·output (precondition_outputs); add_noise x0 + σ·noise;
    init_noise_sigma sqrt(sigma_max² + 1), diffusers' value."""

    edm = True
    custom = ()  # see _custom
    sigma_schedules = ()  # diffusers' EDM classes have no use_*_sigmas keys: their own sigma_schedule instead
    karras_in_name = True  # the names without "_karras" take the config's sigma_schedule
    defaults = dict(
        sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, sigma_schedule="karras", rho=7.0, final_sigmas_type="zero"
    )
    fixed: dict = {}  # the VP classes' fixed keys mean nothing here (diffusers' EDM classes ignore them)
    ramp_dtype = torch.float32  # of the [0, 1] ramp the Karras σ are computed from

    def __init__(self, config=None):
        super().__init__(config)
        # = diffusers' init_noise_sigma property: from the config alone, so before set_timesteps too
        self.init_noise_sigma = (self.config["sigma_max"] ** 2 + 1) ** 0.5

    def _spaced_timesteps(self, n):
        return None  # the timesteps follow from the σ (_schedule)

    def _schedule(self, timesteps, n):
        """= set_timesteps with _compute_karras_sigmas / _compute_exponential_sigmas, then precondition_noise."""
        cfg = self.config
        lo, hi = cfg["sigma_min"], cfg["sigma_max"]
        if self.karras:
            rho = cfg["rho"]
            ramp = torch.linspace(0, 1, n, dtype=self.ramp_dtype)
            min_inv_rho, max_inv_rho = lo ** (1 / rho), hi ** (1 / rho)
            sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
        else:  # a float32 linspace in log σ in both classes; one step is then sigma_min alone, as there
            sigmas = torch.linspace(math.log(lo), math.log(hi), n).exp().flip(0)
        sigmas = sigmas.float()
        final = self._sigma_min_final(sigmas) if cfg["final_sigmas_type"] == "sigma_min" else torch.zeros(1)
        return (0.25 * torch.log(sigmas)).numpy(), torch.cat([sigmas, final]).numpy()

    def _sigma_min_final(self, sigmas):
        """The final σ for final_sigmas_type "sigma_min": EDMEulerScheduler's is its schedule's last σ."""
        return sigmas[-1:]

    def _custom(self, kind, values):
        # EDMDPMSolverMultistepScheduler.set_timesteps takes neither; EDMEulerScheduler's takes sigmas= but reads
        # them as positions on the [0, 1] ramp its sigma_schedule maps to σ, not as σ: refused, not mistaken
        raise ValueError(
            f"the {self.name} scheduler takes no custom {kind}: diffusers' EDM schedulers take no custom timesteps,"
            " and EDMEulerScheduler reads sigmas= as ramp positions, not σ; use num_inference_steps"
        )

    def select_timesteps(self, strength=1.0, denoising_start=None, denoising_end=None):
        if denoising_start is not None or denoising_end is not None:
            raise ValueError(
                f"denoising_start / denoising_end cannot split the {self.name} scheduler's run: its timesteps are "
                "0.25·log σ, not training steps 0..999, and diffusers' pipelines compare them with (1 - fraction)·1000"
                " (denoising_start then runs every step, denoising_end none); use strength for img2img instead"
            )
        return super().select_timesteps(strength)

    def _precompute(self):
        init_noise_sigma = self.init_noise_sigma
        super()._precompute()  # the update rule's tables (EulerDiscrete's also sets its own init_noise_sigma)
        self.init_noise_sigma = init_noise_sigma
        s, sd = self.sigmas, self.config["sigma_data"]
        # = _get_conditioning_c_in and precondition_outputs, written as there (Python `a / t` is t.reciprocal() * a)
        self._c_in = 1 / ((s**2 + sd**2) ** 0.5)
        self._c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2) ** 0.5
        self._c_out = -c_out if self.v_prediction else c_out
        self._keep, self._noise = torch.ones_like(s), s

    def scale_model_input(self, x, t=None):
        return x * self._c_in[self._index(t)]

    def _x0(self, eps, x, i):
        return self._c_skip[i] * x + self._c_out[i] * eps


class EDMEuler(_EDM, EulerDiscrete):
    """Euler on EDM's σ (= diffusers EDMEulerScheduler as the SDXL pipelines step it: s_churn 0, so no noise):
    Euler's step, upcast to fp32 and cast back to the model output's dtype, with EDM's x0. CosXL's scheduler
    (exponential σ, v_prediction, sigma_data 1)."""

    name = "edm_euler"
    ramp_dtype = torch.float64  # = set_timesteps: float64 then float32 (float32 where MPS is available)


class EDMDPMSolverMultistep(_EDM, DPMSolverMultistep):
    """DPM-Solver++ on EDM's σ (= diffusers EDMDPMSolverMultistepScheduler): DPM-Solver's updates, orders and
    SDE noise with alpha_t = 1 and sigma_t = σ, so lambda = -log σ, and EDM's x0. Unlike the VP step nothing is
    upcast: fp16 latents step in fp16, and the SDE noise is drawn in x0's dtype. Playground v2.5's scheduler."""

    name = "edm_dpmpp_2m"
    defaults = dict(
        _EDM.defaults,
        solver_order=2,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        euler_at_final=False,
    )
    fixed = dict(thresholding=False)
    upcast = False

    def __init__(self, config=None):
        super().__init__(config)
        if self.sde and self.solver_order == 3:
            raise ValueError(
                "solver_order 3 with algorithm_type sde-dpmsolver++ is broken in diffusers' EDMDPMSolverMultistep"
                "Scheduler (its third-order update has no SDE branch: it fails at the first 3rd-order step); use "
                "edm_dpmpp_3m (no SDE) or edm_dpmpp_2m_sde"
            )
        self.name = "edm_" + self.name

    def _alpha_sigma_tables(self):
        """= _sigma_to_alpha_sigma_t: the UNet input is preconditioned, so alpha_t = 1 and sigma_t = σ."""
        s = self.sigmas
        self._alpha, self._sigma = torch.ones_like(s), s
        self._lambda = -torch.log(s)  # log(1) - log σ; +inf at a final σ of 0

    def _sigma_min_final(self, sigmas):
        return torch.tensor([self.config["sigma_min"]], dtype=torch.float32)  # the config's, not the last σ


def _pin(schedule=None):
    """What a name pins of the σ schedule: that one on (Karras, exponential, beta) and the others off."""
    return {key: kind == schedule for kind, key in SIGMA_SCHEDULES.items()}


def _dpm(order, schedule, algorithm):
    """What a DPM++ name pins: its order (2M, 3M), its σ schedule, SDE or not."""
    return {"solver_order": order, "algorithm_type": algorithm, **_pin(schedule)}


_KARRAS = {"sigma_schedule": "karras"}


def _edm_dpm(order, karras, algorithm):
    """What an EDM DPM++ name pins: its order, SDE or not, and with "_karras" the Karras σ."""
    return {"solver_order": order, "algorithm_type": algorithm, **(_KARRAS if karras else {})}


# name -> (class, config overrides). The A1111 names users type map onto these, case-insensitively.
_NAMED = {
    "euler": (EulerDiscrete, {}),
    "euler_a": (EulerAncestral, {}),
    "ddim": (DDIM, {}),
    "dpmpp_2m": (DPMSolverMultistep, _dpm(2, None, "dpmsolver++")),
    "dpmpp_2m_karras": (DPMSolverMultistep, _dpm(2, "karras", "dpmsolver++")),
    "dpmpp_2m_sde": (DPMSolverMultistep, _dpm(2, None, "sde-dpmsolver++")),
    "dpmpp_2m_sde_karras": (DPMSolverMultistep, _dpm(2, "karras", "sde-dpmsolver++")),
    "dpmpp_3m": (DPMSolverMultistep, _dpm(3, None, "dpmsolver++")),
    "dpmpp_3m_karras": (DPMSolverMultistep, _dpm(3, "karras", "dpmsolver++")),
    "dpmpp_3m_sde": (DPMSolverMultistep, _dpm(3, None, "sde-dpmsolver++")),
    "dpmpp_3m_sde_karras": (DPMSolverMultistep, _dpm(3, "karras", "sde-dpmsolver++")),
    "dpmpp_2s": (DPMSolverSinglestep, _dpm(2, None, "dpmsolver++")),
    "dpmpp_2s_karras": (DPMSolverSinglestep, _dpm(2, "karras", "dpmsolver++")),
    "dpmpp_2s_sde": (DPMSolverSinglestep, _dpm(2, None, "sde-dpmsolver++")),
    "dpmpp_2s_sde_karras": (DPMSolverSinglestep, _dpm(2, "karras", "sde-dpmsolver++")),
    "dpmpp_3s": (DPMSolverSinglestep, _dpm(3, None, "dpmsolver++")),
    "dpmpp_3s_karras": (DPMSolverSinglestep, _dpm(3, "karras", "dpmsolver++")),
    "dpmpp_3s_sde": (DPMSolverSinglestep, _dpm(3, None, "sde-dpmsolver++")),
    "dpmpp_3s_sde_karras": (DPMSolverSinglestep, _dpm(3, "karras", "sde-dpmsolver++")),
    "heun": (HeunDiscrete, {}),
    "dpmpp_sde": (DPMSolverSDE, _pin()),
    "dpmpp_sde_karras": (DPMSolverSDE, _pin("karras")),
    "dpm2": (KDPM2, _pin()),
    "dpm2_karras": (KDPM2, _pin("karras")),
    "dpm2_a": (KDPM2Ancestral, _pin()),
    "dpm2_a_karras": (KDPM2Ancestral, _pin("karras")),
    "lms": (LMSDiscrete, _pin()),
    "lms_karras": (LMSDiscrete, _pin("karras")),
    "unipc": (UniPCMultistep, {}),  # the config's σ schedule (use_karras_sigmas, ...), as Euler and Heun
    "unipc_karras": (UniPCMultistep, _pin("karras")),  # what a Karras UniPC's name says
    "deis": (DEISMultistep, _pin()),
    "deis_karras": (DEISMultistep, _pin("karras")),
    "lcm": (LCM, {}),
    "tcd": (TCD, {}),
    # EDM models (Playground v2.5, CosXL): the config's sigma_schedule, or with "_karras" Karras σ
    "edm_euler": (EDMEuler, {}),
    "edm_euler_karras": (EDMEuler, _KARRAS),
    "edm_dpmpp_2m": (EDMDPMSolverMultistep, _edm_dpm(2, False, "dpmsolver++")),
    "edm_dpmpp_2m_karras": (EDMDPMSolverMultistep, _edm_dpm(2, True, "dpmsolver++")),
    "edm_dpmpp_2m_sde": (EDMDPMSolverMultistep, _edm_dpm(2, False, "sde-dpmsolver++")),
    "edm_dpmpp_2m_sde_karras": (EDMDPMSolverMultistep, _edm_dpm(2, True, "sde-dpmsolver++")),
    "edm_dpmpp_3m": (EDMDPMSolverMultistep, _edm_dpm(3, False, "dpmsolver++")),
    "edm_dpmpp_3m_karras": (EDMDPMSolverMultistep, _edm_dpm(3, True, "dpmsolver++")),
}


def _with_schedules(named):
    """`named` with the "_exponential" and "_beta" names of each name whose class takes diffusers' exponential
    and beta σ, each after its name (after its "_karras" twin where it has one), pinning the σ schedule."""
    out = {}
    for name, (cls, overrides) in named.items():
        out[name] = cls, overrides
        base = name.removesuffix("_karras")
        if "beta" in cls.sigma_schedules and (name != base or base + "_karras" not in named):
            out.update({f"{base}_{kind}": (cls, {**named[base][1], **_pin(kind)}) for kind in ("exponential", "beta")})
    return out


SCHEDULERS = _with_schedules(_NAMED)
_A1111_NAMED = {
    "Euler": "euler",
    "Euler a": "euler_a",
    "DDIM": "ddim",
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ 2M Karras": "dpmpp_2m_karras",
    "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DPM++ 2M SDE Karras": "dpmpp_2m_sde_karras",
    "DPM++ 3M SDE": "dpmpp_3m_sde",  # A1111 has no 3M without SDE
    "DPM++ 3M SDE Karras": "dpmpp_3m_sde_karras",
    "DPM++ SDE": "dpmpp_sde",
    "DPM++ SDE Karras": "dpmpp_sde_karras",
    "Heun": "heun",
    "DPM2": "dpm2",
    "DPM2 Karras": "dpm2_karras",
    "DPM2 a": "dpm2_a",
    "DPM2 a Karras": "dpm2_a_karras",
    "LMS": "lms",
    "LMS Karras": "lms_karras",
    "UniPC": "unipc",
    "LCM": "lcm",
    "TCD": "tcd",
}


def _a1111_with_schedules(named):
    """`named` with A1111's old-style names of the exponential and beta schedules ("DPM++ 2M Beta": its sampler
    name and schedule type, as A1111 still reads them), each after its sampler's (after its Karras twin)."""
    out = {}
    for a1111, name in named.items():
        out[a1111] = name
        base = a1111.removesuffix(" Karras")
        if a1111 != base or base + " Karras" not in named:
            for kind in ("exponential", "beta"):
                if f"{named[base]}_{kind}" in SCHEDULERS:
                    out[f"{base} {kind.capitalize()}"] = f"{named[base]}_{kind}"
    return out


A1111_NAMES = _a1111_with_schedules(_A1111_NAMED)
DIFFUSERS_CLASSES = {
    "EulerDiscreteScheduler": EulerDiscrete,
    "EulerAncestralDiscreteScheduler": EulerAncestral,
    "DDIMScheduler": DDIM,
    "DPMSolverMultistepScheduler": DPMSolverMultistep,
    "DPMSolverSinglestepScheduler": DPMSolverSinglestep,
    "HeunDiscreteScheduler": HeunDiscrete,
    "DPMSolverSDEScheduler": DPMSolverSDE,
    "KDPM2DiscreteScheduler": KDPM2,
    "KDPM2AncestralDiscreteScheduler": KDPM2Ancestral,
    "LMSDiscreteScheduler": LMSDiscrete,
    "UniPCMultistepScheduler": UniPCMultistep,
    "DEISMultistepScheduler": DEISMultistep,
    "LCMScheduler": LCM,
    "TCDScheduler": TCD,
    "EDMEulerScheduler": EDMEuler,
    "EDMDPMSolverMultistepScheduler": EDMDPMSolverMultistep,
}


def _diffusers_name(cls):
    return next(name for name, c in DIFFUSERS_CLASSES.items() if c is cls)


_ALIASES = {**{k: k for k in SCHEDULERS}, **{k.lower(): v for k, v in A1111_NAMES.items()}}


def make_scheduler(name: str | None = None, config: dict | None = None) -> Scheduler:
    """A scheduler by name ("euler", "Euler a", "DPM++ 2M Karras", ...) or, for None, the one the config's
    `_class_name` names. The config is a diffusers scheduler_config.json dict; None or {} means SDXL's
    (a single-file checkpoint carries none, and diffusers' bare class defaults are not SDXL's betas).
    "euler"/"euler_a"/"ddim" take the config as it is (as diffusers' from_config); the DPM++ names pin
    solver_order (2M, 3M), the σ schedule (use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas: the one
    the name ends in, "_karras", "_exponential" or "_beta", on, the others off) and algorithm_type (SDE or not)
    to what they say, the DPM++ SDE, DPM2, LMS and DEIS names the σ schedule (DEIS's solver_order comes from the
    config), and so do all "_exponential" and "_beta" names ("euler_beta", "heun_exponential", ...; A1111-style
    "Euler Beta", "DPM++ 2M Exponential", ...). The EDM names take the
    config's sigma_schedule ("_karras": Karras σ) and pin what they say (solver_order, algorithm_type). For an
    EDM model's config (Playground v2.5, CosXL) a VP name means its EDM counterpart where one exists ("euler"
    edm_euler, "DPM++ 2M Karras" edm_dpmpp_2m_karras, ...), as no VP scheduler can sample an EDM model."""
    config = dict(config or SDXL_SCHEDULER_CONFIG)
    if name is None:
        cls_name = config.get("_class_name", "EulerDiscreteScheduler")
        if cls_name not in DIFFUSERS_CLASSES:
            raise ValueError(
                f"scheduler config names {cls_name!r}, which minsdxl does not implement ({list(DIFFUSERS_CLASSES)});"
                f" pass a scheduler name instead: {list(SCHEDULERS)} or {list(A1111_NAMES)}"
            )
        return DIFFUSERS_CLASSES[cls_name](config)
    if not isinstance(name, str):
        raise TypeError(f"scheduler name must be a string or None, got {type(name).__name__}")
    key = _ALIASES.get(name.strip().lower())
    if key is None:
        raise ValueError(f"unknown scheduler {name!r}; valid names: {list(SCHEDULERS)} or {list(A1111_NAMES)}")
    if _is_edm(config) and not SCHEDULERS[key][0].edm:
        if "edm_" + key not in SCHEDULERS:
            edm = [n for n in SCHEDULERS if SCHEDULERS[n][0].edm]
            vp = [n for n in (*SCHEDULERS, *A1111_NAMES) if "edm_" + _ALIASES[n.lower()] in SCHEDULERS]
            raise ValueError(
                f"scheduler {name!r} has no EDM counterpart, and this model's scheduler config is an EDM one (its "
                f"_class_name starts with EDM or it has sigma_data); valid names for it: {edm}, or {vp} (mapped onto"
                " those)"
            )
        key = "edm_" + key
    cls, overrides = SCHEDULERS[key]
    return cls({**config, **overrides})


def _is_edm(config):
    return str(config.get("_class_name", "")).startswith("EDM") or "sigma_data" in config
