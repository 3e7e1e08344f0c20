"""Console tables: the `left` columns start at their header, numbers end under theirs, no line
carries trailing blanks."""

from autopeft.tables import print_table


def test_left_columns_and_numbers_line_up(capsys):
    rows = [{"method": "No-FT", "psnr": "34.101", "plan": ""},
            {"method": "autopeft (best, #3)", "psnr": "4.5", "plan": "decoder.*=lora(rank=4)"}]
    print_table(rows, {"method": "Method", "psnr": "PSNR", "plan": "Plan"}, left=("method", "plan"))
    header, first, second = capsys.readouterr().out.splitlines()
    assert first.startswith("No-FT ") and second.startswith("autopeft (best, #3) ")
    assert second.index("decoder") == header.index("Plan")  # left-aligned under its header
    assert first.index("34.101") + len("34.101") == second.index("4.5") + len("4.5")  # right-aligned numbers
    assert all(line == line.rstrip() for line in (header, first, second))
