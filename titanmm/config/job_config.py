"""Typed configuration of a training job. Each dataclass is one TOML section; each field one key."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Job:
    dump_folder: str = "./outputs"
    """Folder for checkpoints, metrics, TensorBoard events and plots of this run."""
    description: str = ""
    """Free text shown at the start of the run."""


@dataclass
class Model:
    name: str = "llama"
    """Model family: llama (Llama / Mistral / Yi / Qwen2 language models) or vlm (vision-language)."""
    flavor: str = "debug"
    """Named shape within the family, e.g. llama3_8b, mistral_7b, qwen2_72b, debug; for vlm e.g.
    llava_mistral_7b_clip336, nvlm_d_72b, nemotron_nano_vl_8b, debug_vlm."""
    tokenizer_path: str = ""
    """HF tokenizer.json (or a folder holding one) or a tiktoken BPE file (Llama 3's tokenizer.model).
    Empty means the tokenizer that ships with titanmm (for the debug flavors)."""
    hf_config: str = ""
    """Take the model shape from this HF config.json (or the folder holding it) instead of `flavor`."""
    n_layers: int = 0
    """Override the number of blocks of the flavor (0 keeps it); for benchmarks and debugging."""
    freeze: list[str] = field(default_factory=list)
    """vlm only: parts whose weights stay fixed: any of "lm", "vision", "projector" (e.g. ["lm", "vision"] to
    pretrain the projector alone). Frozen parameters get no gradients and no optimizer state, and are left out
    of gradient clipping; at least one part must train."""
    sdpa_backends: list[str] = field(default_factory=list)
    """Attention kernels in order of preference, from "cudnn", "flash", "efficient" and "math"
    (scaled_dot_product_attention backends, process-wide): each attention call runs the first that takes its
    inputs. Empty keeps PyTorch's order (flash first). ["cudnn", "flash"] is about 1.9x faster for Llama 3's
    attention on H100s. Packed documents (FlexAttention) are not affected."""


@dataclass
class Optimizer:
    name: str = "AdamW"
    """Optimizer class: AdamW or Adam."""
    lr: float = 8e-4
    """Peak learning rate."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay (applied to matrices and embeddings, not to norms and biases)."""
    implementation: str = "fused"
    """fused, foreach or for-loop. fused falls back to foreach where the device has no fused kernel. Only fused
    clips the gradients and skips a non-finite step inside the kernel, so a step never waits for the GPU;
    the others read the norm on the host at every step."""


@dataclass
class LRScheduler:
    warmup_steps: int = 200
    """Linear warm-up from ~0 to optimizer.lr over this many steps."""
    decay_type: str = "cosine"
    """Shape of the decay after warm-up: cosine, linear, constant or wsd (warmup-stable-decay)."""
    decay_ratio: float = 0.1
    """wsd only: fraction of training.steps spent decaying at the end (linear to min_lr)."""
    min_lr: float = 0.0
    """Learning rate reached at the last step."""


@dataclass
class Training:
    steps: int = 10
    """Number of optimizer steps."""
    seq_len: int = 2048
    """Tokens per sample."""
    local_batch_size: int = 8
    """Samples per data-parallel rank per micro-batch."""
    global_batch_size: int = -1
    """Samples per optimizer step over all data-parallel ranks; -1 means local_batch_size * dp degree.
    Larger values are reached by gradient accumulation."""
    dataset: str = "mock"
    """'mock' for random tokens, 'shipped' for the small corpus that ships with titanmm, or a path to a
    .jsonl / .json / .parquet / .txt file, a folder of those, or a dataset saved with HF datasets.
    For model.name = vlm: 'mock' (random image-text samples), a folder prepared by `energon prepare`
    (e.g. the output of titanmm.data.convert_llava; it has a `.nv-meta/` folder) or an energon metadataset
    .yaml (a weighted blend of such folders); see [multimodal]."""
    text_field: str = "text"
    """Column (jsonl / parquet / HF datasets) holding each document's text."""
    document_masking: bool = True
    """Keep packed documents from attending to each other, and restart positions at each document."""
    shuffle: bool = True
    """Shuffle the order of packed samples (the same order for every layout)."""
    mixed_precision_param: str = "bfloat16"
    """Dtype of parameters during forward/backward (FSDP2 mixed precision). Forced to float32 on CPU."""
    mixed_precision_reduce: str = "float32"
    """Dtype of gradient reduction."""
    single_device_mixed_precision: str = "autocast"
    """How a run on one GPU without any parallelism computes in mixed_precision_param: "autocast" (torch.autocast:
    weights stay float32 and each matmul casts its own; torchtitan's single-GPU path) or "fsdp" (FSDP2 over one
    rank: bf16 copies of every weight and every gradient, about 10% slower for Llama 3 8B widths on an H100)."""
    frozen_params_dtype: str = "param"
    """Dtype in which frozen parameters (model.freeze) are stored: param (the compute dtype,
    mixed_precision_param; float32 on CPU), bfloat16, float16 or float32. They are never updated, so they
    need no float32 master copy: a frozen 7B LM takes half the memory in bfloat16."""
    loss_chunk_tokens: int = 0
    """> 0: the output layer returns the loss, computing the logits, the cross-entropy and their gradients this
    many tokens at a time inside the forward (titanmm.models.lm_head), so the [tokens, vocabulary] logits and their
    gradient never exist whole (Llama 3 at 8,192 tokens per GPU: 2 x 2 GiB). 0: the logits, then the loss. Not
    with pipeline or tensor parallelism, an FP8 output layer, or multimodal.loss_scaling = "sqrt_length"."""
    max_norm: float = 1.0
    """Gradient clipping by global L2 norm; 0 disables clipping."""
    seed: int = 0
    """Seed for weight initialisation, data shuffling and RNG."""
    deterministic: bool = False
    """Use deterministic algorithms (slower)."""
    max_consecutive_nonfinite: int = 5
    """Skip optimizer steps whose loss or grad norm is NaN/Inf; stop after this many in a row. With the fused
    optimizer the skip happens on the GPU and the count is read with the losses, at the next logged step
    (metrics.log_freq) or checkpoint: a streak stops the run there, the skipped steps having changed nothing."""
    gc_freq: int = 50
    """Run Python's garbage collector every this many steps (automatic collection is disabled)."""


@dataclass
class Multimodal:
    chat_template: str = ""
    """Chat template of the vlm training samples: llama3, llama3.1, mistral, chatml, qwen2, nvlm-yi-34b or plain
    (bos + text + eos; needs no special tokens). Empty chooses it from the flavor's language model: mistral ->
    mistral, yi -> nvlm-yi-34b, qwen2 -> qwen2, llama3.1 / 3.2 -> llama3.1, llama3 -> llama3, debug -> plain."""
    task: str = "sft"
    """sft: learn every assistant turn of each conversation. captioning (projector pretraining, LLaVA-Pretrain
    style): the user turn becomes just the image placeholders and the one assistant reply, the caption, is
    learned; energon CaptioningSample datasets are always captions."""
    max_tiles: int = 0
    """Most tiles per image (thumbnail not counted); 0 keeps the flavor's image.max_tiles. Samples that do not
    fit training.seq_len use fewer (12 -> 8 -> 6 -> 4 -> 2 -> 1, as Megatron)."""
    packing: bool = False
    """Pack several samples into each training.seq_len sequence (each sequence in turn gets the subset of a
    buffer of packing_buffer_size samples that fills it most); each keeps its own positions and attends only to
    itself."""
    packing_buffer_size: int = 96
    """Samples each loader worker holds to choose packs from. Larger packs tighter: on LLaVA-665K-like SFT data
    (576-token images) at seq_len 4096, 93% of the tokens are non-padding with 32, 95.7% with 64, 97% with 96,
    97.7% with 128 (benchmarks/vlm_packing.py). A buffered sample holds its tokens and image bytes, not pixels:
    the pixels (float32: 1.4 MB per CLIP-336 image, 2.4 MB per 448-px tile) are made only for the pack being
    emitted, each image decoded once more for it. The first batch (also after a resume) waits until the buffer is
    full, its samples tokenized and their images decoded (to check them and read their size): ~1.2 CPU-seconds
    for 96 samples of 640x480 JPEGs (benchmarks/vlm_loader.py)."""
    num_workers: int = 2
    """Data loader worker processes per data-parallel rank (image decoding and tiling); 0 loads in the
    training process."""
    shuffle_buffer_size: int = 100
    """energon's sample shuffle buffer per worker (0: no shuffling beyond the shard order)."""
    max_samples_per_sequence: int = 100
    """energon reads at most this many consecutive samples of one shard before switching (0: no limit)."""
    loss_scaling: str = "token"
    """token: loss = sum of token cross-entropies / trained tokens of the global batch. sqrt_length
    (Megatron --use-loss-scaling, Nemotron-Nano-VL): each turn t (a run of consecutive trained tokens,
    n_t of them) weighs its token losses by 1 / sqrt(n_t), and loss = sum_t [sum(CE of t) / sqrt(n_t)] /
    sum_t sqrt(n_t) over the global batch, so long replies count less per token than with token averaging
    (Megatron normalises per micro-batch; titanmm over the global batch)."""


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = 1
    """Replicas of the model (DDP-like outer dimension of HSDP)."""
    data_parallel_shard_degree: int = -1
    """FSDP2 shard group size; -1 means whatever the world size leaves."""
    tensor_parallel_degree: int = 1
    """Tensor parallel (with sequence parallel) group size."""
    pipeline_parallel_degree: int = 1
    """Pipeline parallel group size: ranks that each run a part of the model's layers, in sequence."""
    pipeline_parallel_schedule: str = "1F1B"
    """GPipe or 1F1B (one stage per rank); Interleaved1F1B, LoopedBFS or InterleavedZeroBubble (two or
    more stages per rank); ZBVZeroBubble (two stages per rank, placed in a V)."""
    pipeline_parallel_microbatch_size: int = 1
    """Samples per pipeline microbatch; training.local_batch_size / this = microbatches per schedule step."""
    pipeline_parallel_layers_per_stage: int = 0
    """Transformer blocks per stage, counting the first/last_stage_less_layers below; the number of
    stages is then (blocks + those) / this. 0: one stage per rank (two for the multi-stage schedules)."""
    pipeline_parallel_first_stage_less_layers: int = 0
    """The first stage holds this many blocks fewer than the others, to make up for the token embedding
    (and a VLM's vision tower and projector, which live on the first stage)."""
    pipeline_parallel_last_stage_less_layers: int = 0
    """The last stage holds this many blocks fewer than the others, to make up for the final norm, the
    output layer and the loss."""
    context_parallel_degree: int = 1
    """Context parallel group size: each micro-batch's sequence is split over this many ranks (load-balanced
    head-tail chunks) and attention runs as ring attention. GPU only; causal attention without document
    masks (training.document_masking = false)."""
    context_parallel_rotate_method: str = "allgather"
    """How K/V shards travel around the context-parallel ring: allgather (all at once, overlapped) or
    alltoall (one neighbour exchange per ring step; less memory)."""
    enable_loss_parallel: bool = True
    """Under TP, compute the loss on vocabulary-sharded logits without gathering them."""
    fsdp_reshard_after_forward: str = "default"
    """default, always or never: free gathered parameters after forward (never = ZeRO-2 like). default: every unit
    but the final norm + output layer (whose backward comes first)."""


@dataclass
class ActivationCheckpoint:
    mode: str = "none"
    """none, full (recompute every block), selective, or memory_budget (needs compile.enable: the compiler's
    partitioner picks what each block saves for backward, the cheapest recompute within memory_budget)."""
    selective_ac_option: str = "op"
    """selective only: 'op' saves attention and every other bf16 matmul output (torchtitan's policy);
    'op_all_matmuls' saves attention and every matmul output, FP8 ones included (more memory, no matmul
    recomputed); an integer N checkpoints every N-th block."""
    all_matmuls_blocks: int = -1
    """op_all_matmuls only: how many blocks of each stack (from the first; the vision tower's and the language
    model's, and each pipeline stage's, count apart) keep every matmul output; the rest keep every other one, as
    'op'. -1: all. Each block moved to 'op' saves ~0.3 GiB for Llama 3 8B at 8,192 tokens per GPU and costs
    ~0.2% of the step: the knob that fits the fastest policy into the memory there is."""
    memory_budget: float = 0.5
    """memory_budget only: activation memory kept per block, as a fraction of what it keeps without
    checkpointing (1.0: no recompute; 0.0: recompute everything possible, like full)."""


@dataclass
class Compile:
    enable: bool = False
    """torch.compile each transformer block (and the loss)."""
    enable_async_tensor_parallel: bool = False
    """With tensor parallelism: let inductor overlap the TP all-gathers / reduce-scatters with the matmuls
    (micro-pipelining over symmetric memory; GPUs with NVLink). Needs compile.enable."""
    mix_order_reduction: str = "auto"
    """Inductor's mix-order reduction (one kernel for RMSNorm's backward row sums and its weight-gradient column
    sums): "on", "off", or "auto" = off when float8 is enabled, on otherwise. Under FP8 it also pulls the
    transposed FP8 casts of the norm's output (stored three times, once per q/k/v weight gradient) into that
    row-by-row kernel, where their strided stores make it ~2 ms per block on an H100; without it the 8B proxy
    trains 4.3% faster in FP8 and equally fast in bf16."""


@dataclass
class Float8:
    enable: bool = False
    """Train the linear layers in FP8 through torchao's float8 (H100/H200; needs torchao)."""
    recipe: str = "tensorwise"
    """tensorwise (one scale per tensor; FP8 FSDP all-gather), rowwise (one scale per row; more accurate)
    or rowwise_with_gw_hp (rowwise, weight-gradient matmul kept in high precision)."""
    enable_fsdp_float8_all_gather: bool = True
    """tensorwise only: FSDP2 all-gathers the weights already cast to FP8 (half the bytes of bf16)."""
    precompute_float8_dynamic_scale_for_fsdp: bool = True
    """tensorwise with FP8 all-gather: compute every weight's scale in one fused step after the optimizer step."""
    filter_fqns: list[str] = field(default_factory=lambda: ["output", "patch_embed"])
    """Modules never converted, by name path component ("output" = the LM head, "patch_embed" = the vision
    patch embedding, "vision" = the whole vision tower). Linears with dims not divisible by 16 never are."""
    emulate: bool = False
    """Emulate FP8 matmuls in high precision (for tests on CPUs and GPUs without FP8 units)."""
    backend: str = "torchao"
    """torchao. (Transformer Engine is not offered: its layers replace the model's modules with TE modules
    that DTensor TP / FSDP2 / DCP do not compose with, and its wheel does not ship for this stack.)"""


@dataclass
class Checkpoint:
    enable: bool = False
    """Save DCP checkpoints and resume from the latest one in `folder`."""
    folder: str = "checkpoint"
    """Checkpoint folder, relative to job.dump_folder unless absolute."""
    interval: int = 500
    """Save every this many steps (and at the last step)."""
    keep_latest_k: int = 0
    """Delete older checkpoints, keeping this many; 0 keeps all."""
    async_mode: str = "disabled"
    """disabled or async (save in a background thread while training goes on)."""
    initial_load_path: str = ""
    """titanmm checkpoint to start from when `folder` holds none (model weights only)."""
    initial_load_hf: str = ""
    """HF model folder (config.json + safetensors) to start from when `folder` holds none."""
    load_step: int = -1
    """Resume from this step instead of the latest."""


@dataclass
class Metrics:
    log_freq: int = 10
    """Log every this many steps (and at the first and last step)."""
    enable_tensorboard: bool = True
    """Write TensorBoard events to {dump_folder}/tb."""
    enable_jsonl: bool = True
    """Write one JSON object per logged step to {dump_folder}/metrics.jsonl."""
    plot_loss: bool = True
    """Write the loss curve to {dump_folder}/loss.png at the end."""


@dataclass
class Eval:
    enable: bool = False
    """Caption a small image set every `interval` steps and log the captions' CIDEr as eval_cider (vlm models;
    data-parallel layouts: FSDP / HSDP, no tensor or pipeline parallelism). Needs pycocoevalcap and Java."""
    interval: int = 500
    """Evaluate every this many steps."""
    dataset: str = ""
    """The captioning set: a Karpathy split JSON ({"images": [{"filename", "filepath", "split", "cocoid",
    "sentences": [{"raw": caption}, ...]}, ...]}; its "test" images, id = cocoid, else the file name's number)
    or a COCO captions JSON ({"images": [{"id", "file_name"}, ...], "annotations": [{"image_id", "caption"},
    ...]}). Prompts follow the training format (multimodal.chat_template; for multimodal.task = captioning
    just the image, else "Give a brief description of this image in one sentence.")."""
    image_folder: str = ""
    """Folder holding the dataset's images (Karpathy: filepath/filename or filename; COCO: file_name); empty
    means the folder of the dataset JSON."""
    num_samples: int = 64
    """Images evaluated (the first ones of the set), dealt to the data-parallel ranks."""
    max_new_tokens: int = 20
    """Longest caption in tokens."""
    batch_size: int = 8
    """Images per generate call on each data-parallel rank."""


@dataclass
class Profiling:
    enable_profiling: bool = False
    """torch.profiler traces (CPU and CUDA activities) of the steps ending at every multiple of profile_freq."""
    save_traces_folder: str = "profile_traces"
    """Trace folder, relative to job.dump_folder unless absolute: iteration_{step}/rank{r}_trace.json (Chrome trace, for
    ui.perfetto.dev) and rank{r}_kernels.txt (device time by kernel category, device idle time, top kernels)."""
    profile_freq: int = 10
    """Profile (and snapshot memory at) the steps ending at every multiple of this."""
    profiler_warmup: int = 3
    """Steps the profiler runs before each recorded window without keeping them (its start-up costs fall there)."""
    profiler_active: int = 1
    """Steps recorded per window; the profile_freq - profiler_warmup - profiler_active steps before them wait."""
    enable_memory_snapshot: bool = False
    """CUDA only: record the caching allocator's history; every profile_freq steps and on an out-of-memory error
    write {job.dump_folder}/memory_snapshot/iteration_{step}/ (iteration_{step}_oom/): rank{r}_memory_snapshot.pickle
    (for pytorch.org/memory_viz) and rank{r}_memory_peak.txt (peak memory, the largest allocations alive at the peak
    by Python stack)."""
    snapshot_max_entries: int = 100000
    """Allocator events kept in the recorded history (older ones are dropped): the peak is found within them."""


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    training: Training = field(default_factory=Training)
    multimodal: Multimodal = field(default_factory=Multimodal)
    parallelism: Parallelism = field(default_factory=Parallelism)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    float8: Float8 = field(default_factory=Float8)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    metrics: Metrics = field(default_factory=Metrics)
    eval: Eval = field(default_factory=Eval)
    profiling: Profiling = field(default_factory=Profiling)
