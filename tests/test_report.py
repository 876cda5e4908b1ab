import json

import torch

import fxopt
from fxopt import spec
from fxopt.examples import small_cnn
from fxopt.report import Report


def test_report_table_and_json_round_trip(tmp_path):
    optimized = fxopt.optimize(small_cnn(), (torch.randn(1, 3, 32, 32),))
    report = optimized.report
    text = report.to_text()
    assert f"pipeline: {spec.to_text(spec.resolve('default').spec())}" in text
    assert "fold_bn#1" in text and "conv_bn=9" in text and "branch_sum=4" in text
    assert "verification vs eager: ok" in text
    path = report.save(tmp_path / "report.json")
    loaded = Report.from_json(json.loads(path.read_text()))
    assert loaded == report
