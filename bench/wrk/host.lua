-- wrk script for `python -m bench --request limits`: wrk's plain GET, with the Host value given as the
-- script's argument (after `--`), which chooses the bench's rate-limited route; without one, the same GET
-- goes to the route without limits. The request is formatted once, in init. The JSON report line comes
-- from report.lua.
local req = nil

function init(args)
  local host = args[1]
  if host ~= nil and #host > 0 then
    req = wrk.format("GET", nil, { ["Host"] = host })
  else
    req = wrk.format("GET", nil)
  end
end

function request()
  return req
end

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "report.lua")
