"""The one helper the lessons share: matplotlib when it is installed (it is an optional extra)."""


def pyplot(out):
    """matplotlib.pyplot drawing to files, with out's folder made; None (said aloud) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipped {out}")
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    return plt
