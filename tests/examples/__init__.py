"""``examples``: the demo and transfer adapter pools."""
