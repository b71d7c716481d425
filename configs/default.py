"""Every config key dunet_jax knows, with the paper's VOC defaults.

Other config files import this and override; an unknown key passed on the command line
(`--config.train.lr=...`) is rejected by ml_collections because the config is locked.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'voc_segmentation'  # TFDS builder name (see dunet_jax/data/datasets.py)
  data.builder_config = ''           # TFDS builder config name, '' = the builder's default
  data.manual_dir = ''               # where the user put the downloaded archives / extracted tree
  data.tfds_data_dir = ''            # where TFDS writes the prepared dataset ('' = TFDS default)
  data.synthetic = False             # True: generate the built-in dataset into manual_dir first
  data.synthetic_num_train = 0
  data.synthetic_num_val = 0
  data.synthetic_seed = 0            # the built-in images are a pure function of this seed
  data.context_classes = 60          # PASCAL Context: 60 (background = 0, scored: paper) or 59 (background -> 255)
  data.train_split = 'train_aug'
  data.eval_split = 'val'
  data.num_classes = 21
  data.crop_size = 513
  data.min_scale = 0.5
  data.max_scale = 2.0
  data.flip = True
  data.photometric = False
  data.pad_pixel = (124, 116, 104)  # training/eval padding colour: 255 * model.pixel_mean, which normalises to 0
  data.eval_pad_size = 512           # eval images are padded (never resized) to this square size
  data.skip_bad_files = False        # True: skip unreadable / invalid files at build time and count them

  config.model = model = ml_collections.ConfigDict()
  model.backbone = 'resnet'          # 'resnet' | 'xception'
  model.depth = 50                   # ResNet: 18-style tiny ('tiny'), 50, 101; Xception: 65, 71
  model.stage_blocks = ()            # overrides the depth's blocks per stage when non-empty (tiny nets)
  model.base_width = 64              # channels of the first stage's bottleneck
  model.stem = 'deep'                # 'standard' (7x7) | 'deep' (three 3x3 convs: provides conv1_3)
  model.output_stride = 16
  model.multi_grid = (1, 1, 1)
  model.decoder = 'dupsample'        # 'dupsample' | 'bilinear' | 'deeplabv3plus'
  model.aspp = False                 # ASPP on the last feature (DeepLabV3); its output is what the decoder reads
  model.aspp_channels = 256
  model.aspp_rates = (6, 12, 18)     # at output stride 16; scaled by 16 / output_stride
  model.fuse_features = ('b1u2c3',)  # paper's layer names of low-level features to fuse
  model.fuse_channels = 48           # 1x1 conv width of each fused low-level feature
  model.decoder_channels = 256       # width of the decoder's 3x3 convs
  model.fuse_convs = 0               # 3x3 conv + BN + ReLU layers (decoder_channels) in each fused feature's branch
  model.decoder_convs = 2            # 3x3 conv + BN + ReLU layers between the fusion and the 1x1 conv to C'
  model.separable_convs = False      # depthwise-separable 3x3 convs in the decoders (DeepLabV3+'s)
  model.head_init_std = 0.1          # Gaussian init of new layers (the paper's 'variance 0.01')
  model.num_components = 64          # C': the compressed label dimension DUpsample predicts
  model.train_w = False              # W is fixed from the labels (paper); True lets it train
  model.temperature_init = 1.0
  model.pretrained = ''              # .npz of `python -m dunet_jax.convert_weights`; 'none': from scratch on purpose
  model.require_pretrained = False   # True (paper presets): refuse to train without model.pretrained
  model.compute_dtype = 'bfloat16'   # activations; parameters, BN statistics and loss stay float32
  model.cpu_conv = 'matmul'          # bf16 convs on CPU as bf16 matmuls ('matmul') or XLA's ('xla'); models/cpu_conv.py
  model.pixel_mean = (0.485, 0.456, 0.406)  # RGB, 0..1 units; must match the pretrained weights'
  model.pixel_std = (0.229, 0.224, 0.225)   # normalisation (recorded in the .npz, checked on load)

  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 16              # global batch over all devices and processes
  train.optimizer = 'sgd'            # 'sgd' with momentum (the paper) | 'adamw' (faster from scratch)
  train.num_steps = 30000
  train.learning_rate = 0.007
  train.poly_power = 0.9
  train.momentum = 0.9
  train.weight_decay = 1e-4
  train.init_from = ''               # fine-tune: a workdir or WORKDIR/checkpoints/<step> (dunet_jax/fine_tune.py)
  train.w_num_images = 0             # label maps used to fit W; 0 = the whole train split
  # W's eigen-solver: 'exact' (LAPACK eigh), 'randomized' (subspace iteration), 'auto' (exact up to N = 6,144)
  train.w_solver = 'auto'
  train.log_every = 50
  train.eval_every = 5000
  train.checkpoint_every = 1000
  train.keep_checkpoints = 3
  train.peak_flops = 0.0               # peak FLOP/s per chip for MFU; 0 = look up device_kind (dunet_jax/throughput.py)
  # Long runs on accelerators (dunet_jax/xla_options.py, dunet_jax/profiling.py; README: Long runs).
  train.compilation_cache_dir = '{workdir}/xla_cache'  # persistent XLA cache: restarts skip compiling; '' = off
  train.profile_steps = ()           # (first, last): jax.profiler trace of those steps into <workdir>/plugins/profile
  train.deterministic_gpu = False    # True: --xla_gpu_deterministic_ops (bit-equal GPU resume; slower steps)

  config.eval = evaluation = ml_collections.ConfigDict()
  evaluation.batch_size = 8
  evaluation.scales = (1.0,)         # multi-scale test: (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
  evaluation.flip = False            # also average the horizontally mirrored image's probabilities
  evaluation.sliding_window = False  # predict images larger than data.crop_size in overlapping crops
  evaluation.num_images_to_log = 3   # image | ground truth | prediction triplets per evaluation

  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1                     # -1: all devices not used by the other axes
  mesh.fsdp = 1
  return config
