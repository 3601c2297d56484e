# SPDX-License-Identifier: MIT
"""The connected fleet: the MQTT protocol, the device agent, the hub service and its PKI."""
