"""Decoder GFLOPs of every row of the paper's Tables 2 and 3, beside the paper's numbers.

`python benchmarks/flops_tables.py [--size=513]` prints a table on stderr and one JSON line on
stdout. Both columns count 2 FLOPs per multiply-add: XLA does, and so does the paper (its vanilla
DeepLabV3+ decoder, separable 3x3 convs of 256 at 129 x 129 for a 513 input, is 2.76 G
multiply-adds = 5.53 GFLOPs, its Table 3 entry). Our model pads 513 to 528, so stride-4 maps are
132 x 132 (+4.7% positions) and stride-2 maps 264 x 264 (+5.5%) where TensorFlow has 129 / 257.
The decoder is measured on its own inputs (backbone and ASPP excluded, as in the paper).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import voc  # noqa: E402
from dunet_jax import flops  # noqa: E402

# (table, row label, preset, paper decoder GFLOPs, paper mIoU or None)
ROWS = [
    ('2', 'R-50 none', 'r50_os16', 0.80, 73.15),
    ('2', 'R-50 conv1_3', 'r50_os16_conv1_3', 1.13, 72.70),
    ('2', 'R-50 b1u2c3', 'r50_os16_b1u2c3', 1.15, 74.03),
    ('2', 'R-50 b3u6c3', 'r50_os16_b3u6c3', 1.23, 73.43),
    ('2', 'R-50 b1u2c3+b3u6c3', 'r50_os16_b1u2c3_b3u6c3', 1.58, 73.82),
    ('2', 'R-50 conv1_3+b3u6c3', 'r50_os16_conv1_3_b3u6c3', 1.56, 74.20),
    ('3', 'R-50 b1u2c3 vanilla', 'r50_os16_deeplabv3plus_b1u2c3', 5.53, 73.26),
    ('3', 'R-50 conv1_3+b3u6c3 vanilla', 'r50_os16_deeplabv3plus_conv1_3_b3u6c3', 22.34, None),
    ('3', 'X-65 efb2u1c2 vanilla', 'x65_os16_deeplabv3plus_efb2u1c2', 5.53, 78.70),
    ('3', 'X-65 efb2u1c2 proposed', 'x65_os16_efb2u1c2', 1.93, 79.09),
    ('3', 'X-65 mfb1u16c3 vanilla', 'x65_os16_deeplabv3plus_mfb1u16c3', 0.41, 78.74),
    ('3', 'X-65 mfb1u16c3 proposed', 'x65_os16_mfb1u16c3', 1.98, 79.67),
]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', type=int, default=513, help='square input size')
  args = parser.parse_args()
  results = []
  print(f'{"table":<6}{"row":<30}{"ours":>8}{"paper":>8}{"diff":>8}', file=sys.stderr)
  for table, label, preset, paper, miou in ROWS:
    config = voc.get_config(preset)
    ours = flops.measure_decoder(config.model, config.data.num_classes, args.size)
    diff = ours / paper - 1
    print(f'{table:<6}{label:<30}{ours:>8.2f}{paper:>8.2f}{diff:>+8.1%}', file=sys.stderr, flush=True)
    results.append(dict(table=table, row=label, preset=preset, decoder_gflops=round(ours, 3),
                        paper_gflops=paper, relative_difference=round(diff, 3), paper_miou=miou))
  print(json.dumps(dict(benchmark='flops_tables', size=args.size, flop_convention='2 per multiply-add',
                        rows=results)))


if __name__ == '__main__':
  main()
