"""Writes state_dict_shapes.json: key -> shape of the real torchvision / timm state dicts.

  python tests/data/generate_state_dict_shapes.py   # needs torch, torchvision and timm

Run once by hand; tests/test_convert_weights.py reads the JSON so CI checks our key mapping
against the libraries' real naming without installing them. Names and shapes only.
"""
import json
import pathlib

import timm
import torch
import torchvision

MODELS = {
    'resnet50': lambda: torchvision.models.resnet50(),
    'resnet101': lambda: torchvision.models.resnet101(),
    'resnet50c': lambda: timm.create_model('resnet50c'),
    'resnet101d': lambda: timm.create_model('resnet101d'),
    'xception65': lambda: timm.create_model('xception65'),
    'xception71': lambda: timm.create_model('xception71'),
}


def main() -> None:
  library = {'torch': torch.__version__, 'torchvision': torchvision.__version__, 'timm': timm.__version__}
  shapes = {arch: {key: list(value.shape) for key, value in make().state_dict().items()}
            for arch, make in MODELS.items()}
  output = pathlib.Path(__file__).with_name('state_dict_shapes.json')
  lines = [f'{{"versions": {json.dumps(library)},', '"shapes": {']
  for index, (arch, keys) in enumerate(shapes.items()):
    lines.append(f'{json.dumps(arch)}: {{')
    lines.append(',\n'.join(f'{json.dumps(key)}: {json.dumps(shape)}' for key, shape in keys.items()))
    lines.append('}' + (',' if index < len(shapes) - 1 else ''))
  lines.append('}}')
  output.write_text('\n'.join(lines) + '\n')
  print(f'wrote {output}: ' + ', '.join(f'{arch} {len(keys)} keys' for arch, keys in shapes.items()))


if __name__ == '__main__':
  main()
