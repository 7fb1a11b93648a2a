"""The ground floor: the message model, settings, metrics, logs and send-window time rules.

Every other folder may import these modules; they import nothing of pushgw outside core/.
"""
