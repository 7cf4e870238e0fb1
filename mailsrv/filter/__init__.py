"""
The spam filter step at the end of DATA: rspamd (HTTP), spamd (the spamc
protocol) or an external command gives each message a L{Verdict}.
"""
