"""progress.py, the progress of the steps that print nothing else: a terminal line, log lines, silence for
short tasks; and where it is shown (the dataset scan on rank 0, sample_data.py)."""
import io
import os

import pytest

from classification import data, progress
import sample_data


class Clock:
    """A monotonic clock moved on by hand, or by `step` seconds at every reading."""

    def __init__(self, step=0.0):
        self.now, self.step = 100.0, step

    def __call__(self):
        self.now += self.step
        return self.now

    def monotonic(self):
        return self()


def run(tty, seconds_per_item, items=30, **options):
    stream, clock = io.StringIO(), Clock()
    with progress.Progress('Scanning /data/train', total=items, unit='class folders', stream=stream, clock=clock,
                           tty=tty, **options) as shown:
        for done in range(1, items + 1):
            clock.now += seconds_per_item
            shown.update(done, f'{done * 1300:,} images')
    return stream.getvalue()


def test_a_log_gets_a_line_every_ten_seconds_and_one_at_the_end():
    out = run(tty=False, seconds_per_item=1.0)
    assert out.splitlines() == [
        'Scanning /data/train: 2/30 class folders, 2,600 images, 2 s',
        'Scanning /data/train: 12/30 class folders, 15,600 images, 12 s',
        'Scanning /data/train: 22/30 class folders, 28,600 images, 22 s',
        'Scanning /data/train: 30/30 class folders, 39,000 images in 30 s']
    assert '\r' not in out and '\x1b' not in out


def test_a_terminal_gets_one_bar_rewritten_in_place_and_ended_at_the_end():
    out = run(tty=True, seconds_per_item=0.5, items=8)
    assert out.count('\n') == 1 and out.endswith(' in 4 s\x1b[K\n')
    frames = [frame.replace('\x1b[K', '').rstrip('\n') for frame in out.split('\r')[1:]]
    assert frames[0] == 'Scanning /data/train: [############............] 4/8 class folders, 5,200 images, 2 s'
    assert frames[-1] == 'Scanning /data/train: [########################] 8/8 class folders, 10,400 images in 4 s'
    assert len(frames) == 6  # every update from 2 s on, 0.5 s apart (more than the 0.2 s between redraws), and the end


@pytest.mark.parametrize('tty', [True, False])
def test_nothing_is_shown_for_a_short_task_or_when_disabled(tty):
    assert run(tty, seconds_per_item=0.06) == ''  # 1.8 s in all
    assert run(tty, seconds_per_item=1.0, enabled=False) == ''


def test_an_error_ends_the_terminal_line_without_a_final_count():
    stream, clock = io.StringIO(), Clock()
    with pytest.raises(ValueError):
        with progress.Progress('Writing /tmp/x', total=None, stream=stream, clock=clock, tty=True) as shown:
            clock.now += 3
            shown.update(5)
            raise ValueError
    assert stream.getvalue() == '\rWriting /tmp/x: 5, 3 s\x1b[K\n'


def test_the_dataset_scan_shows_its_progress_only_on_the_main_process(fresh_dataset, monkeypatch, capsys):
    root = os.path.join(fresh_dataset(classes=3, train_per_class=2, val_per_class=1), 'train')
    data.scan(root)  # a real clock: a quick scan says nothing
    assert capsys.readouterr().err == ''
    monkeypatch.setattr(progress, 'time', Clock(step=10.0))  # 10 s between readings: a line at every update
    listing = data.scan(root)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f'Scanning {root}: 1/3 class folders, 2 images, 10 s',
                     f'Scanning {root}: 2/3 class folders, 4 images, 20 s',
                     f'Scanning {root}: 3/3 class folders, 6 images, 30 s',
                     f'Scanning {root}: 3/3 class folders, 6 images in 40 s']
    assert len(listing['samples']) == 6
    data.image_folder(root, None, is_main=False)  # rank > 0
    assert capsys.readouterr().err == ''


def test_sample_data_shows_its_progress(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(progress, 'time', Clock(step=11.0))
    sample_data.make_dataset(str(tmp_path), classes=1, train_per_class=2, val_per_class=0)
    assert capsys.readouterr().err.splitlines() == [f'Writing {tmp_path}: 1/2 JPEG files, 11 s',
                                                    f'Writing {tmp_path}: 2/2 JPEG files, 22 s',
                                                    f'Writing {tmp_path}: 2/2 JPEG files in 33 s']
