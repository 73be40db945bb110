// Package firewall decides whether a connection's source address may
// proceed: an IP/CIDR blocklist, GeoIP country blocking and a per-source
// connection rate limiter. It imports nothing else from portcullis.
//
// A GeoDB and a Rules are built once per config snapshot and are
// read-only afterwards, so any number of goroutines may use them. A
// Limiter holds live counters; the caller keeps the same one across
// reloads while its limit and window are unchanged, so a reload does
// not hand every source a fresh budget.
//
// Typical use, once per accepted connection, with the address the PROXY
// header reported if there was one. The blocklist runs first so that a
// blocked address never spends rate-limit quota:
//
//	src := conn.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
//	if v := snap.Rules.Check(src); v != firewall.Allow {
//		reject(conn, v.String()) // "blocked_ip" or "blocked_country"
//		return
//	}
//	if !snap.Limiter.Allow(src, time.Now()) {
//		reject(conn, firewall.RateLimited.String())
//		return
//	}
//
// Building a snapshot:
//
//	geo, err := firewall.OpenGeoDB(cfg.GeoIP.Database) // when configured
//	rules, err := firewall.NewRules(cfg.Firewall.Block, cfg.Firewall.BlockCountries, geo)
//	lim := firewall.NewLimiter(cfg.RateLimit.Connections, cfg.RateLimit.Window, 0)
//
// A nil *Rules and a nil *Limiter allow everything, so an unconfigured
// firewall needs no special case on the data path.
package firewall
