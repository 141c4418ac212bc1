"""The BLE link to the glasses, through bleak only."""
