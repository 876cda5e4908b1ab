import json

import torch

import fxopt
from fxopt.examples import small_cnn
from fxopt.report import Report


def test_report_table_and_json_round_trip(tmp_path):
    optimized = fxopt.optimize(small_cnn(), (torch.randn(1, 3, 32, 32),))
    report = optimized.report
    text = report.to_text()
    assert "pipeline: canonicalize,fold_bn" in text
    assert "fold_bn" in text and "conv_bn=4" in text and "verification vs eager: ok" in text
    path = report.save(tmp_path / "report.json")
    loaded = Report.from_json(json.loads(path.read_text()))
    assert loaded == report
