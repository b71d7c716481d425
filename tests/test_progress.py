"""Progress bars: an ETA on long passes, nothing on short ones."""
from dunet_jax import progress


def test_bars_show_an_eta_only_once_the_work_is_long(capsys, monkeypatch):
  assert list(progress.iterate(range(3), 3, 'scoring', 'batch')) == [0, 1, 2]
  with progress.bar(4, 'evaluating', 'image') as bar:
    bar.update(4)
  assert capsys.readouterr().err == ''  # faster than DELAY_SECONDS: silent
  monkeypatch.setattr(progress, 'DELAY_SECONDS', 0.0)
  assert list(progress.iterate(range(3), 3, 'scoring', 'batch')) == [0, 1, 2]
  err = capsys.readouterr().err
  assert 'scoring' in err and '3/3' in err and '<' in err  # elapsed<remaining: the ETA
