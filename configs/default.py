"""Default configuration: a ResNet-50 from scratch on a DATA_DIR written by `gerne-jax tile`.

  gerne-jax train --config default:method=gerne,model=resnet50 --workdir runs/x \
      --config.data.dir=runs/demo/data --config.method.beta=1.5

`get_config(arg)` takes two declared switches, `method` (gerne, erm, resample, group_dro, jtt or
ratio_weighted; a bare first word is the method) and `model` (resnet18/34/50/101/152 or tiny); every
other key is changed with `--config.<key>=<value>`. The methods are the special cases of docs/design.md §3:

- gerne: the official defaults, beta = 1, c = 0.5, corr = 0.5;
- erm: the biased batch alone (class-balanced, natural group shares within each class), i.e. beta = -1
  without computing the less-biased gradient;
- resample: group-balanced resampling, c = 1 and beta = 0 (the less-biased batch decides);
- group_dro: GroupDRO (Sagawa et al. 2020) on group-balanced batches, `method.group_dro.*`;
- jtt: JTT's second run (Liu et al. 2021) after an ERM identification run, `method.jtt.*`;
- dfr: DFR (Kirichenko et al. 2022), a trained run's last layer refitted on group-balanced validation
  data, `method.dfr.*` (one fit: `training.steps` = 1 labels its checkpoint);
- ratio_weighted: class-balanced batches drawn with weight 1 / (density of the tissue ratio within the
  class), no threshold, `method.ratio_weighted.*`.

GERNE with unknown attributes is `gerne` (or `resample`) with `method.pseudo_groups.scoring_workdir`.
"""
from __future__ import annotations

import ml_collections

from gerne_jax.core.config_utils import parse_arg
from gerne_jax.methods import registry

RESAMPLE = "resample"  # the switch of group resampling: method.name = "gerne" with c = 1, beta = 0


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, method="gerne", model="resnet50")
    registry.check_name("gerne" if arg.method == RESAMPLE else arg.method)  # ConfigError naming the methods
    config = ml_collections.ConfigDict()

    config.data = ml_collections.ConfigDict()
    config.data.dir = "runs/demo/data"     # a DATA_DIR from `gerne-jax tile`
    config.data.taus = (0.1,)              # tissue-ratio thresholds: a = #{tau : r >= tau}
    config.data.in_memory = True           # False: read the array_record shards by index
    config.data.flips = False              # augmentation, off as in the papers
    config.data.rotations = False
    config.data.eval_batch_size = 256

    config.method = ml_collections.ConfigDict()
    # gerne: paired batches; erm: biased alone; the others: gerne_jax/methods/<name>.py (registry.py)
    config.method.name = "gerne" if arg.method == RESAMPLE else arg.method
    config.method.beta = {"gerne": 1.0, RESAMPLE: 0.0}.get(arg.method, -1.0)  # GERNE's, in [-1, beta_max]
    config.method.beta_warmup_steps = 0    # beta ramps linearly from 0 (resampling) over these steps
    config.method.c = 1.0 if arg.method == RESAMPLE else 0.5  # bias-reduction factor, in (0, 1]
    config.method.corr = 0.5               # overlap of the two batches' samples, in [0, 1]
    config.method.empty_group = "error"    # or "drop": leave empty groups out of the less-biased batch
    config.method.fold_beta_into_loss = False  # one-gradient fast path (no per-batch gradient metrics)
    config.method.divide_loss_by_num_classes = True
    config.method.erm = ml_collections.ConfigDict()  # read by method erm only
    # groups: GERNE's biased batch (class-balanced, stratified by group); class_balanced: the same shares
    # without reading the attribute; natural: uniform over the training split (gerne_jax/methods/erm.py)
    config.method.erm.sampling = "groups"
    config.method.group_dro = ml_collections.ConfigDict()  # read by method group_dro only
    config.method.group_dro.eta = 0.01        # step size of the exponentiated-gradient group weights
    config.method.group_dro.adjustment = 0.0  # C of the group adjustment C / sqrt(n_g); 0: none
    config.method.group_dro.sampling = "balanced"  # or "natural": the class-balanced biased batch
    config.method.jtt = ml_collections.ConfigDict()  # read by method jtt only
    config.method.jtt.identification_workdir = ""  # the ERM run of T steps whose errors are upweighted
    config.method.jtt.identification_step = 0     # T: its checkpoint of this step; 0: its latest
    config.method.jtt.upweight = 20.0             # lambda: error examples are drawn this many times as often
    config.method.dfr = ml_collections.ConfigDict()  # read by method dfr only (gerne_jax/methods/dfr.py)
    config.method.dfr.base_workdir = ""           # the trained run whose last layer is refitted
    config.method.dfr.base_checkpoint = "best_wga"  # its best_wga|best_bca|best_worst_class|latest|STEP
    config.method.dfr.c_grid = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)  # inverse L1 strengths tried
    config.method.dfr.num_subsamples = 10         # group-balanced subsamples of half A; weights averaged
    config.method.dfr.split_seed = 0              # the validation split's stratified halves (fit / choose C)
    # gerne with unknown attributes (gerne_jax/methods/pseudo_groups.py): pseudo-groups from a scoring ERM run
    config.method.pseudo_groups = ml_collections.ConfigDict()
    config.method.pseudo_groups.scoring_workdir = ""  # the scoring ERM run (lr / 10, weight decay x 2); "": off
    config.method.pseudo_groups.scoring_checkpoint = "best_bca"  # its checkpoint that scores the training split
    config.method.pseudo_groups.fraction = 0.2    # t: per class, this share with the lowest p_true is minority
    config.method.ratio_weighted = ml_collections.ConfigDict()  # read by method ratio_weighted only
    config.method.ratio_weighted.bandwidth = 0.05  # kernel standard deviation of the tissue-ratio density

    config.model = ml_collections.ConfigDict()
    config.model.name = arg.model          # resnet18/34/50/101/152, tiny
    config.model.norm = "auto"             # frozen | shared | group | separate; auto: frozen with
                                           # pretrained weights, group from scratch
    config.model.dtype = "float32"         # compute dtype: float32 or bfloat16 (params stay float32)
    config.model.init_from = ""            # torchvision/timm ResNet weights (.safetensors or .pth)
    config.model.channel_mapping = ""      # per input channel: red|green|blue|mean|zero, comma-separated

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 1e-3
    config.optimizer.schedule = "constant"  # or "cosine"
    config.optimizer.warmup_steps = 0
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 0.01   # coupled (added to the gradient), as in the official code

    config.training = ml_collections.ConfigDict()
    config.training.steps = 1 if arg.method == "dfr" else 2000
    config.training.batch_per_group = 32   # B: each class gets A * B examples per batch
    config.training.eval_every = 100
    config.training.checkpoint_every = 100
    config.training.log_every = 10
    config.training.seed = 0
    # Precise BatchNorm: before each evaluation and save, recompute the BatchNorm statistics with the
    # current parameters on this many natural-distribution training batches of data.eval_batch_size
    # (docs/methods.md "Precise BatchNorm"); only train-mode BatchNorm (model.norm shared|separate) is affected.
    # 0 (off) by default: the default norms (group from scratch, frozen with pretrained weights) have
    # nothing to recompute, and earlier shared-BatchNorm runs stay reproducible.
    config.training.precise_bn_batches = 0

    config.mesh = ml_collections.ConfigDict()
    config.mesh.num_devices = 0            # 0: all devices (of all processes)
    # Sum every cross-device reduction of the train step in device order (all-gather, then sum), so
    # the parameters do not depend on how the devices are split over processes (docs/scaling.md "Multi-host
    # training"). Each device then holds one gradient copy per device: for small meshes and tests. Not
    # with train-mode BatchNorm (model.norm shared|separate).
    config.mesh.deterministic_reduction = False
    # Several processes (hosts) of one run (docs/scaling.md "Multi-host training"); each process is told its own
    # process_id. auto: start JAX's distributed runtime when coordinator_address is set or srun, mpirun
    # or a TPU pod slice is detected; on: always (JAX reads unset values from the environment); off: never.
    config.mesh.distributed = "auto"
    config.mesh.coordinator_address = ""   # host:port of process 0; "" from the environment
    config.mesh.num_processes = 0          # 0: from the environment
    config.mesh.process_id = -1            # -1: from the environment
    return config
