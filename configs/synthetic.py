"""The built-in demo: a tiny DUNet trained on the generated VOC-layout dataset in a few CPU minutes.

`python -m dunet_jax.main --config=configs/synthetic.py --workdir=/tmp/dunet_demo`
generates the images into data.manual_dir, builds them with the same TFDS builder as real VOC,
fits W, trains, evaluates, and checkpoints. The ":test" preset (configs/synthetic.py:test) is a seconds-long
variant for tests.

The demo trains from scratch on two CPU cores in about three minutes, so it departs from the
paper's ImageNet-initialised SGD recipe where that recipe is slow without pretrained weights:
AdamW, small batches (more updates per CPU second), and T starting at 0.1 instead of 1. W's columns
are orthonormal, so W x for a well-formed code x = W^T v lies in [0, 1]; with T = 1 the logits of
the classes differ by less than 1 and the net spends hundreds of steps shrinking T before it can be
confident, while T = 0.1 gives useful logits from the first steps (T stays learnable either way).
The backbone keeps its depth at 1/16 resolution (three blocks in stage 3), where it is cheap.
C' = 128 rather than the paper's 64: the built-in shapes are thinner than VOC's objects, and
`python -m dunet_jax.upper_bound` on their labels (r = 16) reconstructs val at 91.5 mIoU with
C' = 64 but 99.0 with C' = 128 (VOC: 99.7 already with 64).
"""
import ml_collections

from configs import default
from dunet_jax.data import synthetic


def eval_pad_size(output_stride: int) -> int:
  """data.eval_pad_size for the built-in data: its largest image side, rounded up to a multiple of
  the output stride (the size the model computes at anyway)."""
  return -(-synthetic.MAX_SIDE // output_stride) * output_stride


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config()
  data = config.data
  data.dataset = 'voc_segmentation'
  data.synthetic = True
  data.manual_dir = '/tmp/dunet_jax_data/synthetic/manual'
  data.tfds_data_dir = '/tmp/dunet_jax_data/synthetic/tfds'
  data.synthetic_num_train = 2000
  data.synthetic_num_val = 200
  data.train_split = 'train'
  data.eval_split = 'val'
  data.crop_size = 128
  data.min_scale = 0.75
  data.max_scale = 1.5

  model = config.model
  model.depth = 0
  model.stage_blocks = (1, 1, 3, 1)
  model.base_width = 16
  model.stem = 'deep'
  model.output_stride = 16
  data.eval_pad_size = eval_pad_size(model.output_stride)
  model.decoder = 'dupsample'
  model.aspp = False
  model.fuse_features = ('b1u1',)   # the first unit's output (after the residual add), as measured
  model.fuse_channels = 48
  model.fuse_convs = 0
  model.decoder_convs = 2
  model.decoder_channels = 128
  model.num_components = 128
  # bf16 on CPU: its convolutions run as bf16 matmuls (models/cpu_conv.py); 7% faster per step
  # here, and val mIoU 0.7784 against 0.7688 in float32 at 2,000 steps (README, bf16_convergence).
  model.compute_dtype = 'bfloat16'
  model.temperature_init = 0.1

  train = config.train
  train.optimizer = 'adamw'
  train.batch_size = 8
  train.num_steps = 3000             # 2,000 gave val mIoU 0.778, 3,000 0.811 (README)
  train.learning_rate = 0.004
  train.weight_decay = 1e-4
  train.log_every = 50
  train.eval_every = 1500
  train.checkpoint_every = 500
  config.eval.batch_size = 16

  if arg == 'test':
    data.synthetic_num_train = 32
    data.synthetic_num_val = 16
    data.crop_size = 64
    model.stage_blocks = (1, 1, 1, 1)
    # r = 8: W's eigenproblem has N = 8*8*21 = 1,344 rows instead of 5,376 at r = 16, which makes
    # every run that fits W (most subprocess tests) start several seconds sooner.
    model.output_stride = 8
    data.eval_pad_size = eval_pad_size(model.output_stride)
    model.decoder_channels = 16
    model.fuse_channels = 8
    model.num_components = 16
    # SGD's updates are linear in the gradients, so runs on different device topologies agree to
    # float precision, which the fault-tolerance tests check; Adam's normalisation turns float-level
    # differences in near-zero gradients into large parameter differences.
    train.optimizer = 'sgd'
    train.learning_rate = 0.02
    model.compute_dtype = 'float32'  # bf16 rounding would differ between topologies
    train.batch_size = 8
    train.num_steps = 6
    train.log_every = 2
    train.eval_every = 6
    train.checkpoint_every = 3
    config.eval.batch_size = 8
  elif arg:
    raise ValueError(f'Unknown preset {arg!r} for configs/synthetic.py: use no preset or ":test".')
  return config
