"""Which convs ran with a fused epilogue (``cad_spconv.engines.epilogue``), for the tests."""
from cad_spconv.engines import epilogue


def fused_epilogues(monkeypatch) -> list:
    """From here on, per ``epilogue.conv_map`` call with a ReLU or a residual: whether oneDNN
    ran it fused (``epilogue.fuses``); plain convs (prepacked, no epilogue) are not listed."""
    answers, real = [], epilogue.conv_map

    def spy(x, weight, bias, stride, padding, dilation, groups, relu=False, residual=None,
            *args, **kwargs):
        if relu or residual is not None:
            answers.append(epilogue.fuses(x, weight, bias, residual, groups))
        return real(x, weight, bias, stride, padding, dilation, groups, relu, residual, *args,
                    **kwargs)

    monkeypatch.setattr(epilogue, "conv_map", spy)
    return answers
