"""How good and how honest the model is: the held-out evaluation, calibration, the unknown-input
detector and its outlier sets, the map's faithfulness, the comparison with the model it would
replace, the plots, and live accuracy from the prediction log."""
