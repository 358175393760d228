"""Stand-in for comfy/utils.py ProgressBar (a125cd8, L1024-1045)."""

BARS = []


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total, self.current, self.node_id = total, 0, node_id
        BARS.append(self)

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.current = min(value, self.total)

    def update(self, value):
        self.update_absolute(self.current + value)
