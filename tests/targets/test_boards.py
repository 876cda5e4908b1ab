import pytest

from fxopt.errors import TargetError
from fxopt.targets import get_target


def test_presets_derive_from_their_family():
    a76 = get_target("cortex-a76")
    assert a76.base == "arm64" and a76.tvm["mcpu"] == "cortex-a76" and a76.toolchain == "aarch64-linux-gnu-"
    rvv = get_target("riscv64-rvv")
    assert "+v" in rvv.tvm["mattr"] and rvv.qemu_cpu == "rv64,v=true,vlen=128,vext_spec=v1.0" and rvv.capabilities.vector_bits == 128
    assert "+v" not in get_target("riscv64").tvm["mattr"]
    x60 = get_target("spacemit-x60")
    assert x60.capabilities.vector_bits == 256 and x60.cores == 8 and x60.base == "riscv64-rvv"
    assert {"+v", "+zba", "+zbb"} <= set(x60.tvm["mattr"]) and "zbb=true" in x60.qemu_cpu
    assert get_target("cuda").tvm["arch"] == "sm_80" and not get_target("opencl").runs_here()


def test_board_file(tmp_path):
    board = tmp_path / "k1.toml"
    board.write_text('base = "riscv64-rvv"\nname = "k1"\ncores = 8\nqemu_cpu = "rv64,v=true,vlen=256,vext_spec=v1.0"\n'
                     'run_command = ["ssh", "k1"]\n[tvm]\nmcpu = "spacemit-x60"\n[capabilities]\nvector_bits = 256\n')
    target = get_target(str(board))
    assert target.name == "k1" and target.base == "riscv64-rvv" and target.tvm["mcpu"] == "spacemit-x60"
    assert "+v" in target.tvm["mattr"] and target.capabilities.vector_bits == 256 and target.run_command == ("ssh", "k1")


@pytest.mark.parametrize(
    "text, message",
    [
        ('base = "riscv64"\nvlen = 256\n', "unknown field(s) vlen"),
        ('name = "x"\n', "needs `base"),
        ('base = "riscv65"\n', "unknown target 'riscv65'"),
        ('base = "arm64"\ncores = 0\n', "cores must be a positive integer"),
        ('base = "arm64"\n[capabilities]\nsimd = 1\n', "[capabilities] accepts"),
        ('base = "arm64"\ncores = [\n', "is not valid TOML"),
        ('base = "arm64"\nrunner = "teleport"\n', "runner 'teleport' is unknown"),
    ],
    ids=["field", "no-base", "bad-base", "cores", "capability", "toml", "runner"],
)
def test_bad_board_files_name_the_file_and_field(tmp_path, text, message):
    board = tmp_path / "board.toml"
    board.write_text(text)
    with pytest.raises(TargetError) as info:
        get_target(str(board))
    assert message in str(info.value) and "board.toml" in str(info.value)


def test_missing_board_file():
    with pytest.raises(TargetError, match="cannot read board file"):
        get_target("/nonexistent/board.toml")
