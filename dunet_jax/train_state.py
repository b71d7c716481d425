"""The training state: the model's variables, the optimizer and its state, and their shardings.

One `TrainState` is what the jitted step takes and returns (donated), what a checkpoint saves
and restores, and what evaluation turns back into a model; `create_train_state` builds it, with
its shardings, for a mesh.
"""
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from dunet_jax import sharding
from dunet_jax.models import dunet

# The arrays of a TrainState, in the order the checkpoint items are named after them.
ARRAY_FIELDS = ('params', 'model_state', 'opt_state')


class TrainState(struct.PyTreeNode):
  """Trainable parameters, the rest of the model's state (BatchNorm statistics, a frozen W) and the
  optimizer state; the model's graph (in train mode) and the optimizer ride along as static data."""
  graphdef: nnx.GraphDef = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  params: nnx.State
  model_state: nnx.State
  opt_state: optax.OptState

  def apply_gradients(self, grads: nnx.State, model_state: nnx.State) -> 'TrainState':
    """One optimizer update of the parameters, with the model state the forward pass produced."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(params=optax.apply_updates(self.params, updates), model_state=model_state,
                        opt_state=opt_state)

  def eval_model(self) -> dunet.DUNet:
    """The model with these variables, in eval mode (it shares the arrays, it does not copy them)."""
    model = nnx.merge(self.graphdef, self.params, self.model_state)
    model.eval()
    return model


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The paper's poly schedule: learning_rate * (1 - step / num_steps) ** poly_power, 0 from num_steps on."""
  return optax.polynomial_schedule(init_value=config.train.learning_rate, end_value=0.0,
                                   power=config.train.poly_power, transition_steps=config.train.num_steps)


def make_optimizer(config: ml_collections.ConfigDict, params: nnx.State) -> optax.GradientTransformation:
  """SGD with momentum (the paper; or AdamW), poly learning rate, weight decay on kernels only.

  BatchNorm scales and biases, the temperature T and a trainable W are not decayed: decaying W
  pulls it away from the label subspace it was fitted to (one of the reimplementations' faults).
  """
  schedule = learning_rate_schedule(config)
  decay_mask = jax.tree_util.tree_map_with_path(lambda path, _: _variable_name(path) == 'kernel', params)
  if config.train.optimizer == 'sgd':
    return optax.chain(optax.add_decayed_weights(config.train.weight_decay, mask=decay_mask),
                       optax.sgd(schedule, momentum=config.train.momentum))
  if config.train.optimizer == 'adamw':
    return optax.adamw(schedule, weight_decay=config.train.weight_decay, mask=decay_mask)
  raise ValueError(f'config.train.optimizer={config.train.optimizer!r}: use "sgd" (the paper) or "adamw".')


def _variable_name(path: tuple) -> str:
  """The attribute name of the variable a state leaf belongs to ('kernel', 'bias', 'scale', ...)."""
  return [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)][-1]


# XLA:CPU spends about a second on every compile, however small the program: eager initialisation
# compiles one program per parameter shape (tens of seconds for a DUNet), so `create_model` compiles
# the whole initialisation as one program, without LLVM's costly optimisations (it runs once).
_FAST_CPU_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def create_model(config: ml_collections.ConfigDict, fitted_w: np.ndarray | None) -> dunet.DUNet:
  """A freshly initialised DUNet, with W and ImageNet backbone weights when given."""
  from dunet_jax.models import pretrained  # only needed when a backbone checkpoint is given

  def make() -> dunet.DUNet:
    return dunet.DUNet(config.model, config.data.num_classes, reconstruction=fitted_w,
                       rngs=nnx.Rngs(config.seed))

  graphdef = nnx.graphdef(nnx.eval_shape(make))
  options = _FAST_CPU_COMPILE if jax.default_backend() == 'cpu' else None
  initialise = jax.jit(lambda: nnx.state(make()), compiler_options=options)
  model = nnx.merge(graphdef, initialise())
  pretrained.load_pretrained(model.backbone, config.model)
  return model


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, trainable params, everything else: BatchNorm statistics, a frozen W, T's state)."""
  return nnx.split(model, nnx.Param, ...)


def create_train_state(config: ml_collections.ConfigDict, fitted_w: np.ndarray | None,
                       mesh: Mesh) -> tuple[TrainState, TrainState]:
  """(state, shardings): a freshly initialised state placed on `mesh`, and the tree of its shardings.

  The shardings (FSDP rules of `sharding.parameter_sharding`, else replicated) are what the train
  step's inputs and outputs and a restored checkpoint are laid out with.
  """
  model = create_model(config, fitted_w)
  model.train()
  graphdef, params, model_state = split_model(model)
  tx = make_optimizer(config, params)
  state = TrainState(graphdef=graphdef, tx=tx, params=params, model_state=model_state,
                     opt_state=tx.init(params))
  shardings = sharding.tree_shardings(mesh, state)
  return jax.device_put(state, shardings), shardings


def abstract(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `state` laid out with `shardings`: the target a checkpoint restores into."""
  return jax.tree.map(lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
                      state, shardings)
