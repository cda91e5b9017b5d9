"""PyInstaller runtime hook: runs first in every frozen evomsgd process (daemon and CLI alike).

1. CA certificates. The bundled OpenSSL looks for them where the build distro keeps them
   (/usr/lib/ssl), which is wrong on Alpine, RHEL, NixOS...: use certifi's bundle unless the
   operator chose a trust store with SSL_CERT_FILE or SSL_CERT_DIR.
2. The bootloader's death. A single-file executable unpacks itself into $TMPDIR/_MEIxxxxxx and
   runs this Python process as its child; it forwards signals to us and deletes the directory
   when we exit. If the bootloader itself is SIGKILLed (OOM killer, kill -9 of systemd's main
   PID), we would live on as an orphan and the directory would stay. So we watch it (a pidfd):
   when it dies we send ourselves SIGTERM - the daemon drains once and exits - and at exit we
   delete the directory it can no longer delete.
3. Upgrades. Python modules are imported lazily from the archive inside the executable (a
   phone region's metadata is loaded the first time a number of that region comes in), and
   PyInstaller reopens the executable by path for each import. Once `dpkg` or `install` replaced
   /usr/bin/evomsgd, a running daemon would read the new file at the old offsets. So we hold a
   descriptor of the file we were started from and read through it.
4. Unpack directories left when both processes were SIGKILLed. Each live process holds an flock
   on a marker in its own directory; a directory whose marker nobody holds any more is ours,
   dead, and removed here. A directory without the marker is another program's, or one still
   unpacking: never touched.
"""

import atexit
import fcntl
import os
import select
import shutil
import signal
import stat
import sys
import threading

_MARKER = ".evomsgd-alive"


def _use_certifi() -> None:
    if "SSL_CERT_FILE" not in os.environ and "SSL_CERT_DIR" not in os.environ:
        import certifi

        os.environ["SSL_CERT_FILE"] = certifi.where()


def _pin_own_archive() -> None:
    import pyimod02_importers  # PyInstaller's loader: pinned in packaging/requirements-build.txt

    archive = pyimod02_importers.pyz_archive
    try:
        fd = os.open(archive._filename, os.O_RDONLY | os.O_CLOEXEC)
    except (AttributeError, OSError):
        return
    archive._filename = f"/proc/self/fd/{fd}"  # the same inode, whatever the path holds later


def _follow_bootloader(here: str) -> None:
    parent = os.getppid()
    try:
        pidfd = os.pidfd_open(parent)
    except OSError:
        return
    if os.getppid() != parent:  # it died before we could watch it
        os.kill(os.getpid(), signal.SIGTERM)

    def wait_for_its_death() -> None:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)  # a pidfd becomes readable when its process exits
        poller.poll()
        os.kill(os.getpid(), signal.SIGTERM)

    def remove_unpack_dir_if_orphaned() -> None:
        if os.getppid() != parent:
            shutil.rmtree(here, ignore_errors=True)

    threading.Thread(target=wait_for_its_death, name="bootloader-watch", daemon=True).start()
    atexit.register(remove_unpack_dir_if_orphaned)


def _sweep_dead_unpack_dirs(here: str) -> None:
    try:
        # Locked before it gets its name, so a sweeper never sees our marker unlocked.
        fd = os.open(
            os.path.join(here, _MARKER + ".new"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        fcntl.flock(fd, fcntl.LOCK_EX)  # held, fd never closed, until this process ends
        os.rename(os.path.join(here, _MARKER + ".new"), os.path.join(here, _MARKER))
    except OSError:
        return
    parent, uid = os.path.dirname(here), os.getuid()
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        path = os.path.join(parent, name)
        if not name.startswith("_MEI") or path == here:
            continue
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
                continue
            other = os.open(os.path.join(path, _MARKER), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its process is alive
        finally:
            os.close(other)
        shutil.rmtree(path, ignore_errors=True)


_use_certifi()
_pin_own_archive()
_here = os.path.normpath(sys._MEIPASS)  # type: ignore[attr-defined]
if os.path.basename(_here).startswith("_MEI"):  # single-file build: we were unpacked
    _follow_bootloader(_here)
    _sweep_dead_unpack_dirs(_here)
